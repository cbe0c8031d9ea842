// Engine: the single-process splitmoe engine — one model directory loaded whole, prompts
// prefetched in one pass, decoding incrementally from the latent cache (the absorbed form), with
// sampling, stop conditions and logprobs. It is the reference the cluster must reproduce and the
// baseline of every benchmark. One caller at a time.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto engine, Engine::Load(dir));
//   GenerateRequest req;
//   req.prompt = {0, 3923, 374};
//   req.max_tokens = 16;
//   SPLITMOE_ASSIGN_OR_RETURN(GenerateResult out, engine->Generate(req, nullptr));
#ifndef SPLITMOE_COMMON_ENGINE_ENGINE_H_
#define SPLITMOE_COMMON_ENGINE_ENGINE_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/engine/batch_decoder.h"
#include "common/engine/on_device.h"
#include "common/engine/request_check.h"
#include "common/engine/sampler.h"
#include "common/engine/transformer.h"
#include "common/model/checkpoint.h"
#include "common/model/weights.h"
#include "common/tokenizer/tokenizer.h"

namespace splitmoe::engine {

struct EngineOptions {
  // Attention form of prompt passes; decode always uses the absorbed form over the latents.
  AttentionForm prefill_form = AttentionForm::kAuto;
  bool load_mtp = true;
  // Weights in the checkpoint's dtype (BF16/FP8, widened as read) or widened to fp32 at load.
  model::ResidentDType weights = model::ResidentDType::kCheckpoint;
  // Pack weights for oneDNN (faster GEMMs, see bench/blas_choice_bench.cc); off: plain OpenBLAS.
  bool pack_weights = true;
  // Speculative decoding with the model's MTP module: K draft tokens per verification pass
  // (BatchDecoder); 0: off. Needs the module (load_mtp and a checkpoint that ships it).
  int64_t draft_tokens = 0;
  // Where the forward pass runs: "cpu", or "cuda:N" (kernels::ParseDevice) in a process whose
  // CUDA backend is enabled (kernels::EnableCudaOps). On a GPU the same Transformer runs on that
  // device's ops: the weights are uploaded once as `device_weights` (kFloat32: the mode that
  // must give the CPU's greedy tokens; kBFloat16: the fast mode, whose drift is measured), the
  // latent caches live in a device pool of `device_cache_tokens` tokens (fp32, or BF16 in the
  // BF16 mode), prompts attend in the absorbed form, and weights are never packed.
  std::string device = "cpu";
  model::WeightDType device_weights = model::WeightDType::kFloat32;
  int64_t device_cache_tokens = 32768;
};

struct ScoreResult {
  std::vector<int32_t> tokens;
  std::vector<std::optional<TokenLogprob>> prompt_logprobs;  // [0] is empty
  // MTP module 0: entry i is log p(token i+2 | ...), for i in [0, n-2).
  std::vector<TokenLogprob> mtp_logprobs;
};

struct GenerateRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_tokens = 16;
  int64_t logprobs = -1;          // < 0: none; K >= 0: the chosen token's logprob and the top K
  std::vector<std::string> stop;  // stop strings (need the tokenizer)
  std::vector<int32_t> stop_token_ids;  // besides eos
  bool ignore_eos = false;
};

// The request as CheckRequest sees it (views into r, which must outlive it).
RequestShape ShapeOf(const GenerateRequest& r, bool has_tokenizer);

struct GenerateResult {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<TokenLogprob> logprobs;
  std::string finish_reason;  // "length" | "stop"
  SpeculativeStats speculative;  // with EngineOptions::draft_tokens > 0
};

// Called as tokens are produced: the new token and the text that became final with it.
using TokenCallback = std::function<void(int32_t token, absl::string_view text)>;

class Engine {
 public:
  // Prompts run through the model in chunks of this many tokens: attention scratch grows with
  // chunk x context, and the result is identical (causal attention over the cache).
  static constexpr int64_t kPrefillChunkTokens = 256;  // also PrefillFirstToken's

  static absl::StatusOr<std::unique_ptr<Engine>> Load(const std::string& model_dir,
                                                      const EngineOptions& options = {});

  const model::ModelConfig& config() const { return config_; }
  const model::ModelWeights& weights() const { return weights_; }
  // Null when the model directory has no tokenizer.json.
  const tokenizer::Tokenizer* tokenizer() const { return tokenizer_.get(); }
  Transformer& transformer() { return *transformer_; }
  // Where the forward pass runs (EngineOptions::device).
  const kernels::Device& device() const { return transformer_->device(); }
  // An empty latent cache for one sequence on the engine's device: every main layer, or the MTP
  // module's one (`mtp`). On a GPU its blocks come from the engine's pool (ResourceExhausted
  // when a Forward needs more than remain).
  absl::StatusOr<std::unique_ptr<SequenceCache>> NewCache(bool mtp = false);

  absl::StatusOr<ScoreResult> Score(const std::vector<int32_t>& tokens, int64_t top_logprobs,
                                    bool with_mtp);
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const TokenCallback& on_token);

  // Checks a request before any compute: prompt non-empty, ids in range, context, sampling.
  absl::Status ValidateRequest(const GenerateRequest& request) const;

 private:
  Engine() = default;
  // Runs `tokens` into `cache` chunk by chunk; hidden [tokens, hidden_size] final-normed.
  absl::Status Prefill(absl::Span<const int32_t> tokens, SequenceCache* cache,
                       std::vector<float>* hidden);
  EngineOptions options_;
  model::ModelConfig config_;
  model::ModelWeights weights_;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  // On a GPU (declared before what computes with it, so it goes after them).
  std::unique_ptr<OnDevice> on_device_;
  std::unique_ptr<LocalMoeExecutor> moe_;
  std::unique_ptr<Transformer> transformer_;
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_ENGINE_H_
