// ModelConfig: every field of a DeepSeek-V2/V3 `config.json` (Hugging Face layout) that changes
// the math, parsed and validated once. Immutable after parsing; safe to share across threads.
//
//   SPLITMOE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig("/models/ds-v3"));
//   if (config.IsMoeLayer(layer)) ...
#ifndef SPLITMOE_COMMON_MODEL_CONFIG_H_
#define SPLITMOE_COMMON_MODEL_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace splitmoe::model {

enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };
enum class ScoringFunc { kSoftmax, kSigmoid };

absl::string_view TopkMethodName(TopkMethod method);
absl::string_view ScoringFuncName(ScoringFunc func);

struct YarnScaling {
  bool enabled = false;  // config.json has rope_scaling of type yarn
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense SwiGLU layers
  int64_t moe_intermediate_size = 0;  // each routed / shared expert
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t q_lora_rank = 0;  // 0 when config.json says null: q = x @ q_proj^T directly
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t n_shared_experts = 0;
  int64_t n_routed_experts = 0;  // 0: no MoE layers at all
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  TopkMethod topk_method = TopkMethod::kGreedy;
  ScoringFunc scoring_func = ScoringFunc::kSoftmax;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  YarnScaling yarn;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  int64_t num_nextn_predict_layers = 0;
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Values cached per token per layer by the absorbed (decode) form: c_kv plus the RoPE key.
  int64_t latent_dim() const { return kv_lora_rank + qk_rope_head_dim; }
  bool IsMoeLayer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  bool UsesGroups() const { return n_group > 1 && topk_method != TopkMethod::kGreedy; }
  bool HasScoreBias() const { return topk_method == TopkMethod::kNoauxTc; }
  // (qk_head_dim)^-0.5, times mscale^2 under YaRN, as DeepSeek's reference does.
  double SoftmaxScale() const;
};

// config.json is a few KiB; anything larger is not one.
inline constexpr uint64_t kMaxConfigJsonBytes = 1 << 20;

// Parses config.json text; `source` names the file in errors. Besides the math (divisibility,
// ranges, known methods) every size-like field has an upper bound far above any published
// DeepSeek-V2/V3/R1 config (e.g. num_hidden_layers 1024, hidden_size 65536, vocab_size 4M,
// n_routed_experts 65536), as do the expert instances, the largest tensor and the parameter
// count they imply together, so that a hostile config.json is refused with the field named
// ("config.json: n_routed_experts = 4194304 exceeds the limit 65536") before anything is sized
// by it.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);
// Reads DIR/config.json (a regular file of at most kMaxConfigJsonBytes; a FIFO or directory is
// refused, never waited on).
absl::StatusOr<ModelConfig> LoadModelConfig(absl::string_view model_dir);
// Serialises back to the Hugging Face field names (used by make-tiny; round-trips Parse).
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_CONFIG_H_
