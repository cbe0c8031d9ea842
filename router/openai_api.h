// The OpenAI-compatible API's translation, without any networking: a request body of
// POST /v1/completions or /v1/chat/completions becomes the public Generate requests (one per
// choice), and the Generate events become OpenAI's responses: one JSON object, or the chunks of
// a `stream: true` response (server-sent events). The HTTP front door (http_front_door.h) does
// the I/O; the router's Generation service does the rest (validation, tokenisation, the chat
// template, admission), exactly as for a gRPC client.
//
// Accepted: model (the served model's name; another is 404 model_not_found), prompt (a string,
// token ids, or a list of either: one choice each), messages (role, content as a string, null or
// text parts, name, tool_calls, tool_call_id), stream, stream_options.include_usage, max_tokens,
// max_completion_tokens, temperature, top_p, seed, stop, logprobs, top_logprobs, n (1), user;
// vLLM's extensions top_k, ignore_eos, stop_token_ids, add_generation_prompt. A field set to
// something this server cannot honour (n > 1, echo, best_of > 1, penalties, logit_bias, suffix,
// response_format other than text, tool_choice forcing a call, a non-text content part) is a
// 400 naming it, never silently dropped. Unknown fields are ignored, as vLLM does.
#ifndef SPLITMOE_ROUTER_OPENAI_API_H_
#define SPLITMOE_ROUTER_OPENAI_API_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "splitmoe/v1/generation.pb.h"

namespace splitmoe::router::openai {

enum class Endpoint { kCompletions, kChat };

// What the server fills in when a request leaves it out.
struct Defaults {
  std::string model_name;
  // OpenAI's defaults unless the model's generation_config.json says otherwise.
  double temperature = 1.0;
  double top_p = 1.0;
  // /v1/completions without max_tokens (OpenAI: 16). Chat completions default to the context.
  int32_t completion_max_tokens = 16;
};

struct ApiRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  // One Generate per choice, request_id set.
  std::vector<v1::GenerateRequest> generates;
  bool stream = false;
  bool include_usage = false;
  // How many alternatives each token's logprobs list: -1 none asked (completions' `logprobs`
  // null, chat's `logprobs` false); 0 the chosen token's logprob only.
  int32_t top_logprobs = -1;
  std::string id;  // "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;
};

// Parses and checks a request body. InvalidArgument names the field; NotFound for another
// model. `random_seed` seeds a sampling request that gave no seed (each request differs, as
// OpenAI's do).
absl::StatusOr<ApiRequest> ParseRequest(Endpoint endpoint, absl::string_view body,
                                        const Defaults& defaults, uint64_t random_seed);

// An error as OpenAI answers it.
struct ApiError {
  int http_status = 500;
  std::string message;
  std::string type;  // "invalid_request_error", "authentication_error", ...
  std::string code;  // "model_not_found", "invalid_api_key", ... or empty (null)
};
// The HTTP status and error object for a failed request (absl or gRPC codes alike).
ApiError ErrorFrom(absl::StatusCode code, absl::string_view message);
std::string ErrorBody(const ApiError& error);

// Builds the response of one request from its Generate events, as they arrive. Not
// thread-safe.
class ResponseBuilder {
 public:
  // `tokenizer` (may be null) names tokens in logprobs.
  ResponseBuilder(const ApiRequest& request, std::string model,
                  const tokenizer::Tokenizer* tokenizer);

  // Takes choice `index`'s next event; returns the stream chunks (JSON texts, without the SSE
  // framing) it makes, in order. The first call of a chat choice opens with the role chunk.
  std::vector<std::string> Add(size_t index, const v1::GenerateEvent& event);
  // The last chunk of a stream with include_usage: no choices, the usage of all.
  std::string UsageChunk() const;
  // The whole response of a request that did not stream (every choice finished).
  std::string Response() const;

 private:
  struct Choice {
    std::string text;
    std::string finish_reason;
    nlohmann::json logprobs;  // accumulated, in the endpoint's shape
    bool started = false;
    int64_t text_offset = 0;
    int32_t prompt_tokens = 0;
    int32_t completion_tokens = 0;
    int32_t cached_tokens = 0;
  };
  nlohmann::json ChunkFrame() const;
  nlohmann::json LogprobsOf(Choice& choice, const v1::GenerateEvent& event) const;
  nlohmann::json Usage() const;

  Endpoint endpoint_;
  std::string id_;
  int64_t created_;
  std::string model_;
  int32_t top_logprobs_;
  bool include_usage_;
  const tokenizer::Tokenizer* tokenizer_;
  std::vector<Choice> choices_;
};

// JSON text of `value` with invalid UTF-8 replaced (never throws).
std::string Dump(const nlohmann::json& value);

}  // namespace splitmoe::router::openai

#endif  // SPLITMOE_ROUTER_OPENAI_API_H_
