// Fuzzes the HTTP front door's translation (router/openai_api.h): the input is a request body
// for /v1/completions or /v1/chat/completions (the first byte picks which). Whatever it is, the
// answer is a request or an InvalidArgument / NotFound status (never a crash, an exception or
// another code); an accepted request has 1..64 Generate requests, each with a prompt, a
// positive max_tokens (or 0 with context_max_tokens, chat only), sampling the engine takes and
// logprob counts within 20; the response builder then takes arbitrary events for it and writes
// JSON that parses.
#include <cstdint>
#include <string>

#include "nlohmann/json.hpp"
#include "router/openai_api.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace openai = splitmoe::router::openai;
  namespace v1 = splitmoe::v1;
  if (size < 1 || size > splitmoe::fuzz::kMaxInputBytes) return -1;
  const openai::Endpoint endpoint =
      (data[0] & 1) != 0 ? openai::Endpoint::kChat : openai::Endpoint::kCompletions;
  const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  openai::Defaults defaults;
  defaults.model_name = "tiny";
  absl::StatusOr<openai::ApiRequest> r = openai::ParseRequest(endpoint, body, defaults, size);
  if (!r.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(r.status()) || absl::IsNotFound(r.status()),
               "refused with " << r.status());
    const openai::ApiError e = openai::ErrorFrom(r.status().code(), r.status().message());
    FUZZ_CHECK(e.http_status == 400 || e.http_status == 404, "HTTP " << e.http_status);
    FUZZ_CHECK(!nlohmann::json::parse(openai::ErrorBody(e), nullptr, false).is_discarded(),
               "the error body is not JSON");
    return 0;
  }
  FUZZ_CHECK(!r->generates.empty() && r->generates.size() <= 64,
             r->generates.size() << " generates");
  FUZZ_CHECK(r->top_logprobs >= -1 && r->top_logprobs <= 20, "top_logprobs " << r->top_logprobs);
  for (const v1::GenerateRequest& g : r->generates) {
    FUZZ_CHECK(g.prompt_case() != v1::GenerateRequest::PROMPT_NOT_SET, "no prompt");
    FUZZ_CHECK(endpoint == openai::Endpoint::kChat ? g.has_messages() : !g.has_messages(),
               "prompt kind does not match the endpoint");
    FUZZ_CHECK(g.stop().max_tokens() > 0 ||
                   (g.stop().max_tokens() == 0 && g.stop().context_max_tokens() &&
                    endpoint == openai::Endpoint::kChat),
               "max_tokens " << g.stop().max_tokens());
    const v1::SamplingParams& s = g.sampling();
    FUZZ_CHECK(s.temperature() >= 0 && s.top_p() > 0 && s.top_p() <= 1 && s.top_k() >= 0,
               "sampling " << s.temperature() << " " << s.top_p() << " " << s.top_k());
    FUZZ_CHECK(g.logprobs() >= 0 && g.logprobs() <= 20, "logprobs " << g.logprobs());
  }
  // Arbitrary events (derived from the input) through the response builder.
  openai::ResponseBuilder builder(*r, "tiny", nullptr);
  for (size_t i = 0; i < r->generates.size(); ++i) {
    v1::GenerateEvent e;
    e.add_token_ids(static_cast<int32_t>(data[0]));
    e.set_text(body.substr(0, std::min<size_t>(body.size(), 16)));  // may be invalid UTF-8
    v1::TokenLogprob* lp = e.add_logprobs();
    lp->set_token(static_cast<int32_t>(i));
    lp->set_logprob(-static_cast<float>(size));
    e.set_finished(true);
    for (const std::string& chunk : builder.Add(i, e)) {
      FUZZ_CHECK(!nlohmann::json::parse(chunk, nullptr, false).is_discarded(),
                 "a chunk is not JSON: " << chunk);
    }
  }
  FUZZ_CHECK(!nlohmann::json::parse(builder.Response(), nullptr, false).is_discarded(),
             "the response is not JSON");
  FUZZ_CHECK(!nlohmann::json::parse(builder.UsageChunk(), nullptr, false).is_discarded(),
             "the usage chunk is not JSON");
  return 0;
}
