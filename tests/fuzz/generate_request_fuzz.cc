// Fuzzes the router's public front door: the input is the raw bytes of a Generation.Generate
// (and Generation.Tokenize) request, parsed as the handlers do (ParseRawRequest) and, for
// Generate, validated against a tiny DeepSeek-V3 config (vocabulary 129280 as the real
// tokenizer's model, a 4096-token context) with the real tokenizer and without one. A request the
// validator accepts must have a non-empty prompt of in-vocabulary ids that, with max_tokens, fits
// the context, and sampling and logprob settings the engine takes.
#include <grpcpp/grpcpp.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/engine/sampler.h"
#include "common/model/tiny.h"
#include "common/tokenizer/tokenizer.h"
#include "router/generation_service.h"
#include "splitmoe/v1/generation.pb.h"
#include "tests/fuzz/fuzz_util.h"

namespace splitmoe::fuzz {
namespace {

const tokenizer::Tokenizer* tok = nullptr;
model::ModelConfig config;

void CheckAccepted(const v1::GenerateRequest& r, const std::vector<int32_t>& prompt) {
  FUZZ_CHECK(!prompt.empty(), "accepted an empty prompt");
  for (int32_t id : prompt) {
    FUZZ_CHECK(id >= 0 && id < config.vocab_size, "accepted prompt id " << id);
  }
  if (r.prompt_case() == v1::GenerateRequest::kTokenIds) {
    FUZZ_CHECK(static_cast<int>(prompt.size()) == r.token_ids().ids_size(),
               "the prompt is not the request's ids");
  }
  // With context_max_tokens, max_tokens 0 is what the context leaves (the handler writes that
  // into the request).
  const int32_t max_tokens = splitmoe::router::EffectiveMaxTokens(r, prompt.size(), config);
  FUZZ_CHECK(max_tokens > 0, "accepted max_tokens " << max_tokens);
  FUZZ_CHECK(
      static_cast<int64_t>(prompt.size()) + max_tokens <= config.max_position_embeddings,
      prompt.size() << " prompt tokens + max_tokens " << max_tokens
                    << " accepted past the context");
  const v1::SamplingParams& s = r.sampling();
  FUZZ_CHECK(std::isfinite(s.temperature()) && s.temperature() >= 0, "temperature accepted");
  const double top_p = s.top_p() == 0 ? 1.0 : s.top_p();
  FUZZ_CHECK(top_p > 0 && top_p <= 1, "top_p " << s.top_p() << " accepted");
  FUZZ_CHECK(s.top_k() >= 0, "top_k " << s.top_k() << " accepted");
  FUZZ_CHECK(r.logprobs() >= 0 && r.logprobs() <= 20, "logprobs " << r.logprobs() << " accepted");
  FUZZ_CHECK(r.prompt_logprobs() >= 0 && r.prompt_logprobs() <= 20,
             "prompt_logprobs " << r.prompt_logprobs() << " accepted");
  for (const std::string& stop : r.stop().stop()) FUZZ_CHECK(!stop.empty(), "empty stop string");
  for (int32_t id : r.stop().stop_token_ids()) {
    FUZZ_CHECK(id >= 0 && id < config.vocab_size, "accepted stop token id " << id);
  }
}

}  // namespace
}  // namespace splitmoe::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  namespace fuzz = splitmoe::fuzz;
  splitmoe::model::TinyModelOptions o;
  o.max_position_embeddings = 4096;
  absl::StatusOr<splitmoe::model::ModelConfig> config = splitmoe::model::TinyModelConfig(o);
  if (!config.ok()) fuzz::Die(config.status().ToString());
  fuzz::config = *config;
  absl::StatusOr<std::unique_ptr<splitmoe::tokenizer::Tokenizer>> loaded =
      splitmoe::tokenizer::Tokenizer::LoadFromDir(fuzz::RealTokenizerDir());
  if (!loaded.ok()) fuzz::Die(loaded.status().ToString());
  fuzz::tok = loaded->release();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fuzz = splitmoe::fuzz;
  namespace v1 = splitmoe::v1;
  if (size > fuzz::kMaxInputBytes) return -1;
  grpc::Slice slice(data, size);
  const grpc::ByteBuffer raw(&slice, 1);

  v1::GenerateRequest request;
  absl::Status parsed = splitmoe::router::ParseRawRequest(raw, &request);
  if (parsed.ok()) {
    const splitmoe::tokenizer::Tokenizer* const tokenizers[] = {fuzz::tok, nullptr};
    for (const splitmoe::tokenizer::Tokenizer* t : tokenizers) {
      absl::StatusOr<std::vector<int32_t>> prompt =
          splitmoe::router::ValidateGenerateRequest(request, fuzz::config, t);
      if (prompt.ok()) {
        fuzz::CheckAccepted(request, *prompt);
      } else {
        FUZZ_CHECK(absl::IsInvalidArgument(prompt.status()),
                   "refused with a code other than INVALID_ARGUMENT: " << prompt.status());
      }
    }
  } else {
    FUZZ_CHECK(absl::IsInvalidArgument(parsed), "parse error " << parsed);
  }

  v1::TokenizeRequest tokenize;
  absl::Status parsed_tokenize = splitmoe::router::ParseRawRequest(raw, &tokenize);
  if (parsed_tokenize.ok()) {
    // The handler's whole work after parsing: the text was checked to be UTF-8, so it encodes.
    absl::StatusOr<std::vector<int32_t>> ids =
        fuzz::tok->Encode(tokenize.text(), tokenize.add_special_tokens());
    FUZZ_CHECK(ids.ok(), "a parsed TokenizeRequest's text does not encode: " << ids.status());
  }
  return 0;
}
