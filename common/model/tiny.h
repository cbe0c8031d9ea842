// Tiny-model generator: writes a deterministic, seeded DeepSeek-V3-architecture checkpoint in
// the Hugging Face layout (config.json, BF16 or FP8 safetensors, optional shards with an index,
// the tokenizer files), for tests, benchmarks and the demo. The same options and seed give the
// same bytes on every machine: weights come from a counter-based integer generator, never from
// libm. Its output head is scaled so next-token distributions are peaked, which makes greedy
// decoding meaningful on random weights.
//
//   TinyModelOptions o;            // the embedded default model
//   o.style = "v2";                // softmax gating, group_limited_greedy, no bias, q_lora null
//   SPLITMOE_RETURN_IF_ERROR(WriteTinyModel(o, "/tmp/tiny", tokenizer_dir));
#ifndef SPLITMOE_COMMON_MODEL_TINY_H_
#define SPLITMOE_COMMON_MODEL_TINY_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model/config.h"

namespace splitmoe::model {

struct TinyModelOptions {
  // "v3": sigmoid + noaux_tc with e_score_correction_bias, q_lora, YaRN, MTP.
  // "v2": softmax + group_limited_greedy, no bias, q_lora_rank null, YaRN.
  // "v2-greedy": softmax + greedy, a single group.
  std::string style = "v3";
  bool fp8 = false;         // F8_E4M3 linear weights with 128x128 weight_scale_inv
  int64_t mtp_layers = -1;  // -1: 1 for v3, 0 otherwise
  uint64_t seed = 1;
  int64_t shards = 1;  // > 1: model-0000k-of-0000n.safetensors + index
  // Sizes; 0 means the style's default.
  int64_t vocab_size = 129280;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t first_k_dense_replace = -1;
  int64_t num_attention_heads = 0;
  int64_t q_lora_rank = -1;  // -1: style default; 0: null
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t intermediate_size = 0;
  int64_t moe_intermediate_size = 0;
  int64_t n_routed_experts = 0;
  int64_t n_shared_experts = -1;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 0;
  int64_t topk_group = 0;
  int64_t max_position_embeddings = 0;
  double logit_scale = 12.0;  // std of the logits, in units of the normed hidden state
  // The MTP module: "random" (the default; its drafts rarely match the main model, which shows
  // the cost of speculative decoding) or "agree": a model whose next token depends mostly on
  // the current one (every o_proj and down_proj scaled by 1/20) and an MTP module that predicts
  // exactly that from the token it reads (enorm all ones, eh_proj = [I 0], shared_head.norm and
  // .head = the main final norm and lm_head), so most drafts are accepted.
  std::string mtp_draft = "random";
  // > 0 (v3 style): e_score_correction_bias of the first num_experts_per_tok experts raised by
  // this much, so every token routes to the same experts (selection only; the gate weights are
  // the unbiased scores). It models a large batch, whose pass reads every expert anyway: a
  // speculative verification pass's extra rows then read no extra expert weights.
  double expert_skew = 0.0;
};

// The writer generates every tensor in memory before writing: a model whose BF16 weights exceed
// this is refused before anything is allocated or written. (The benchmark model is ~0.8 GB.)
inline constexpr uint64_t kMaxTinyModelBytes = uint64_t{4} << 30;
inline constexpr int64_t kMaxTinyShards = 1024;

// The config the options describe, validated like any config.json (ParseModelConfig's bounds).
absl::StatusOr<ModelConfig> TinyModelConfig(const TinyModelOptions& options);

// Writes the checkpoint into out_dir (created if needed). tokenizer_dir, when not empty, holds
// tokenizer.json and tokenizer_config.json to copy next to the weights.
// The benchmark model every speed figure uses (docs/performance.md): DeepSeek-V3 style, hidden
// 1024, 4 layers (1 dense), 16 heads, q_lora 384, kv_lora 256, rope 32, 64 routed experts (top-6
// of 8 groups, 4 kept) + 1 shared, moe_inter 512, vocab 32768, no MTP.
TinyModelOptions BenchModelOptions();

absl::Status WriteTinyModel(const TinyModelOptions& options, const std::string& out_dir,
                            const std::string& tokenizer_dir);

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_TINY_H_
