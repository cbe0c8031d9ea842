// The one check of a generation request, for every entry that takes one: the engine
// (Engine::Generate, `splitmoe generate`), the GPU engine, the router's Generate RPC (after it
// turned text into token ids), the decode worker's reservations (the sizes it is told) and the
// batch prefill (each prompt alone). Each entry keeps only what is its own (the router its
// request id and UTF-8, the decode worker its reservation bookkeeping).
//
//   RequestShape shape{.prompt = ids, .max_tokens = 16, .sampling = &params};
//   SPLITMOE_RETURN_IF_ERROR(CheckRequest(config, shape));
#ifndef SPLITMOE_COMMON_ENGINE_REQUEST_CHECK_H_
#define SPLITMOE_COMMON_ENGINE_REQUEST_CHECK_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/engine/sampler.h"
#include "common/model/config.h"

namespace splitmoe::engine {

// Top logprobs a request may ask for (per generated token and per prompt token).
inline constexpr int64_t kMaxLogprobs = 20;

// What a request asks for, whatever its wire form.
struct RequestShape {
  absl::Span<const int32_t> prompt;
  int64_t max_tokens = 0;
  int64_t logprobs = -1;         // < 0: none
  int64_t prompt_logprobs = -1;  // < 0: none
  absl::Span<const std::string> stop;
  absl::Span<const int32_t> stop_token_ids;
  const SamplingParams* sampling = nullptr;  // null: not checked (the caller has none)
  bool has_tokenizer = false;                // stop strings need one
  int64_t max_context = 0;  // > 0: a tighter context than the model's (a GPU engine's cache)
  // How errors name the field, as the caller's users spell it.
  absl::string_view max_tokens_name = "max_tokens";
};

// Ids in [0, vocab_size): "`what` ID outside the vocabulary [0, V)".
absl::Status CheckTokenIds(const model::ModelConfig& config, absl::Span<const int32_t> ids,
                           absl::string_view what);

// prompt_tokens + max_tokens within the context (max_context when > 0, and the model's).
absl::Status CheckContext(const model::ModelConfig& config, int64_t prompt_tokens,
                          int64_t max_tokens, int64_t max_context = 0,
                          absl::string_view max_tokens_name = "max_tokens");

// Everything above, and max_tokens > 0, logprobs within kMaxLogprobs, non-empty stop strings
// (with a tokenizer), stop token ids in the vocabulary, the sampling parameters.
absl::Status CheckRequest(const model::ModelConfig& config, const RequestShape& request);

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_REQUEST_CHECK_H_
