#include "common/engine/request_check.h"

#include "absl/strings/str_cat.h"

namespace splitmoe::engine {

absl::Status CheckTokenIds(const model::ModelConfig& config, absl::Span<const int32_t> ids,
                           absl::string_view what) {
  for (int32_t id : ids) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " ", id, " outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckContext(const model::ModelConfig& config, int64_t prompt_tokens,
                          int64_t max_tokens, int64_t max_context,
                          absl::string_view max_tokens_name) {
  int64_t context = config.max_position_embeddings;
  if (max_context > 0 && max_context < context) context = max_context;
  if (prompt_tokens > context || max_tokens > context - prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt (", prompt_tokens, " tokens) + ",
                                                   max_tokens_name, " (", max_tokens,
                                                   ") exceeds the context of ", context, " tokens"));
  }
  return absl::OkStatus();
}

absl::Status CheckRequest(const model::ModelConfig& config, const RequestShape& r) {
  if (r.prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  if (absl::Status s = CheckTokenIds(config, r.prompt, "prompt token id"); !s.ok()) return s;
  if (r.max_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.max_tokens_name, " must be > 0, got ", r.max_tokens));
  }
  if (absl::Status s = CheckContext(config, static_cast<int64_t>(r.prompt.size()), r.max_tokens,
                                    r.max_context, r.max_tokens_name);
      !s.ok()) {
    return s;
  }
  if (r.logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs must be in [0, ", kMaxLogprobs, "], got ", r.logprobs));
  }
  if (r.prompt_logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("prompt_logprobs must be in [0, ",
                                                   kMaxLogprobs, "], got ", r.prompt_logprobs));
  }
  if (!r.stop.empty() && !r.has_tokenizer) {
    return absl::InvalidArgumentError(
        "stop strings need a tokenizer, and the model directory has none");
  }
  for (const std::string& s : r.stop) {
    if (s.empty()) return absl::InvalidArgumentError("empty stop string");
  }
  if (absl::Status s = CheckTokenIds(config, r.stop_token_ids, "stop token id"); !s.ok()) return s;
  return r.sampling == nullptr ? absl::OkStatus() : ValidateSamplingParams(*r.sampling);
}

}  // namespace splitmoe::engine
