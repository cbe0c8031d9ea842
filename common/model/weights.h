// The weights of a DeepSeek-V2/V3 model (matrices in their checkpoint dtype or fp32, see
// tensor.h; norms and biases in fp32), and the one description of the checkpoint's
// tensor names and shapes (TensorLayout) shared by the loader and the tiny-model writer.
//
// LoadWeights can load a subset: a role that serves attention loads everything but the routed
// experts; an expert service loads only its shard's routed experts. Whatever is not asked for
// is not read. A full load also refuses tensors the model does not use.
//
//   LoadOptions options;                 // everything
//   options.routed_experts = false;      // attention side only
//   SPLITMOE_ASSIGN_OR_RETURN(ModelWeights w, LoadWeights(*checkpoint, options));
#ifndef SPLITMOE_COMMON_MODEL_WEIGHTS_H_
#define SPLITMOE_COMMON_MODEL_WEIGHTS_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/checkpoint.h"
#include "common/model/config.h"
#include "common/model/tensor.h"

namespace splitmoe::model {

// One SwiGLU MLP: down(silu(gate(x)) * up(x)). gate/up [inter, hidden], down [hidden, inter].
struct MlpWeights {
  Matrix gate, up, down;
  uint64_t bytes() const { return gate.bytes() + up.bytes() + down.bytes(); }
};

struct AttentionWeights {
  Matrix q_proj;                 // [heads * qk_head_dim, hidden], when q_lora_rank == 0
  Matrix q_a_proj;               // [q_lora_rank, hidden]
  std::vector<float> q_a_norm;   // [q_lora_rank]
  Matrix q_b_proj;               // [heads * qk_head_dim, q_lora_rank]
  Matrix kv_a_proj;              // [kv_lora_rank + qk_rope_head_dim, hidden]
  std::vector<float> kv_a_norm;  // [kv_lora_rank]
  Matrix kv_b_proj;              // [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
  Matrix o_proj;                 // [hidden, heads * v_head_dim]
};

struct LayerWeights {
  bool is_moe = false;
  bool has_attention = false;     // false in an expert-only load
  std::vector<float> input_norm;  // [hidden]
  std::vector<float> post_attention_norm;
  AttentionWeights attn;
  MlpWeights dense;              // dense layers only
  Matrix gate;                   // [n_routed, hidden], MoE layers
  std::vector<float> gate_bias;  // [n_routed], noaux_tc only (selection only)
  MlpWeights shared;             // [n_shared * moe_inter] wide; empty when n_shared == 0
  // Routed experts by global id; null where this process does not hold the expert.
  std::vector<std::unique_ptr<MlpWeights>> experts;
  // The same, as the pointers kernels::RoutedExperts takes.
  std::vector<const MlpWeights*> HeldExperts() const {
    std::vector<const MlpWeights*> held;
    held.reserve(experts.size());
    for (const auto& e : experts) held.push_back(e.get());
    return held;
  }
};

// DeepSeek-V3 multi-token prediction module k: predicts token t+2+k.
struct MtpWeights {
  Matrix embed;  // [vocab, hidden]
  std::vector<float> enorm, hnorm;
  Matrix eh_proj;  // [hidden, 2 * hidden]: input is [enorm(emb); hnorm(h)]
  LayerWeights block;
  std::vector<float> head_norm;  // shared_head.norm
  Matrix head;                   // shared_head.head [vocab, hidden]
};

struct ModelWeights {
  Matrix embed;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;
  Matrix lm_head;  // [vocab, hidden]; a copy of embed when tied
  std::vector<MtpWeights> mtp;

  uint64_t bytes() const;  // resident bytes, however each weight is held
};

struct LoadOptions {
  bool attention_side = true;  // embeddings, attention, norms, dense, shared experts, gate, head
  bool routed_experts = true;
  // Which routed experts to hold (layer, expert) when routed_experts; null: all of them.
  std::function<bool(int64_t layer, int64_t expert)> expert_filter;
  bool mtp = true;  // load MTP modules when the checkpoint has them
  // BF16/FP8 matrices stay in their dtype (views of the mapped checkpoint) or become fp32.
  ResidentDType resident = ResidentDType::kCheckpoint;
};

// Expected tensors of a checkpoint for `config`, in a stable order.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool quantizable = false;  // stored as F8_E4M3 + weight_scale_inv in FP8 checkpoints
};
std::vector<TensorSpec> TensorLayout(const ModelConfig& config, bool include_mtp);

absl::StatusOr<ModelWeights> LoadWeights(Checkpoint& checkpoint, const LoadOptions& options);

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_WEIGHTS_H_
