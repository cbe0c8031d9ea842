#include "router/openai_api.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/base/json_text.h"
#include "common/base/mix64.h"
#include "common/base/status_macros.h"
#include "common/engine/request_check.h"

namespace splitmoe::router::openai {
namespace {

using nlohmann::json;

// JSON nested deeper than this is refused before parsing (common/base/json_text.h).
constexpr int kMaxNesting = 64;

absl::Status Bad(absl::string_view param, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("'", param, "' ", what));
}

// A field that is absent or null.
bool Absent(const json& body, const char* key) {
  auto it = body.find(key);
  return it == body.end() || it->is_null();
}

absl::StatusOr<bool> GetBool(const json& body, const char* key, bool fallback) {
  if (Absent(body, key)) return fallback;
  const json& v = body.at(key);
  if (!v.is_boolean()) return Bad(key, "must be a boolean");
  return v.get<bool>();
}

absl::StatusOr<int64_t> GetInt(const json& body, const char* key, int64_t fallback, int64_t lo,
                               int64_t hi) {
  if (Absent(body, key)) return fallback;
  const json& v = body.at(key);
  if (!v.is_number_integer()) return Bad(key, "must be an integer");
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi)) {
    return Bad(key, absl::StrCat("must be in [", lo, ", ", hi, "]"));
  }
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) return Bad(key, absl::StrCat("must be in [", lo, ", ", hi, "], got ", x));
  return x;
}

absl::StatusOr<double> GetNumber(const json& body, const char* key, double fallback, double lo,
                                 double hi) {
  if (Absent(body, key)) return fallback;
  const json& v = body.at(key);
  if (!v.is_number()) return Bad(key, "must be a number");
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) {
    return Bad(key, absl::StrCat("must be in [", lo, ", ", hi, "], got ", x));
  }
  return x;
}

// A field this server cannot honour unless it has its neutral value.
absl::Status Unsupported(const json& body, const char* key, const json& neutral,
                         absl::string_view why) {
  if (Absent(body, key)) return absl::OkStatus();
  const json& v = body.at(key);
  if (v == neutral || (v.is_object() && v.empty() && neutral.is_object())) return absl::OkStatus();
  return Bad(key, absl::StrCat("is not supported by this server", why.empty() ? "" : ": ", why));
}

absl::StatusOr<v1::TokenIds> TokenIdsOf(const json& v, absl::string_view param) {
  v1::TokenIds ids;
  for (const json& id : v) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return Bad(param, "token ids must be non-negative integers");
    }
    ids.add_ids(static_cast<int32_t>(id.get<int64_t>()));
  }
  return ids;
}

// The prompts of a completions request: one string, one list of ids, or a list of either.
absl::StatusOr<std::vector<v1::GenerateRequest>> CompletionPrompts(const json& body) {
  if (Absent(body, "prompt")) return Bad("prompt", "is required");
  const json& p = body.at("prompt");
  std::vector<v1::GenerateRequest> out;
  auto add_text = [&](const std::string& text) {
    v1::GenerateRequest r;
    r.set_text(text);
    out.push_back(std::move(r));
  };
  if (p.is_string()) {
    add_text(p.get<std::string>());
  } else if (p.is_array() && !p.empty() && p.front().is_number()) {
    SPLITMOE_ASSIGN_OR_RETURN(v1::TokenIds ids, TokenIdsOf(p, "prompt"));
    v1::GenerateRequest r;
    *r.mutable_token_ids() = std::move(ids);
    out.push_back(std::move(r));
  } else if (p.is_array() && !p.empty()) {
    for (const json& item : p) {
      if (item.is_string()) {
        add_text(item.get<std::string>());
      } else if (item.is_array()) {
        SPLITMOE_ASSIGN_OR_RETURN(v1::TokenIds ids, TokenIdsOf(item, "prompt"));
        v1::GenerateRequest r;
        *r.mutable_token_ids() = std::move(ids);
        out.push_back(std::move(r));
      } else {
        return Bad("prompt", "must be a string, a list of token ids, or a list of those");
      }
    }
  } else {
    return Bad("prompt", "must be a non-empty string, a list of token ids, or a list of those");
  }
  constexpr size_t kMaxPrompts = 64;
  if (out.size() > kMaxPrompts) {
    return Bad("prompt", absl::StrCat("holds ", out.size(), " prompts; at most ", kMaxPrompts));
  }
  return out;
}

// A message's content: a string, null, or a list of text parts (joined with newlines, as vLLM
// does).
absl::Status ContentOf(const json& message, size_t i, v1::ChatMessage* out) {
  auto it = message.find("content");
  if (it == message.end() || it->is_null()) return absl::OkStatus();
  const std::string param = absl::StrCat("messages[", i, "].content");
  if (it->is_string()) {
    out->set_content(it->get<std::string>());
    return absl::OkStatus();
  }
  if (!it->is_array()) return Bad(param, "must be a string, null or a list of content parts");
  std::vector<std::string> texts;
  for (const json& part : *it) {
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string()) {
      return Bad(param, "parts must be objects with a 'type'");
    }
    const std::string type = part["type"].get<std::string>();
    if (type != "text") {
      return Bad(param, absl::StrCat("part of type '", type,
                                     "' is not supported (this model reads text only)"));
    }
    if (!part.contains("text") || !part["text"].is_string()) {
      return Bad(param, "text parts need a string 'text'");
    }
    texts.push_back(part["text"].get<std::string>());
  }
  out->set_content(absl::StrJoin(texts, "\n"));
  return absl::OkStatus();
}

// `ordered` is the body with its objects' key order kept (tool schemas and arguments are
// passed to the template as the client wrote them).
absl::StatusOr<v1::ChatMessages> ChatMessagesOf(const json& body,
                                                const nlohmann::ordered_json& ordered) {
  if (Absent(body, "messages")) return Bad("messages", "is required");
  const json& messages = body.at("messages");
  if (!messages.is_array() || messages.empty()) {
    return Bad("messages", "must be a non-empty list of messages");
  }
  v1::ChatMessages out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const std::string at = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return Bad(at, "must be an object");
    if (!m.contains("role") || !m["role"].is_string()) return Bad(at + ".role", "must be a string");
    v1::ChatMessage* msg = out.add_messages();
    msg->set_role(m["role"].get<std::string>());
    SPLITMOE_RETURN_IF_ERROR(ContentOf(m, i, msg));
    if (!Absent(m, "name")) {
      if (!m["name"].is_string()) return Bad(at + ".name", "must be a string");
      msg->set_name(m["name"].get<std::string>());
    }
    if (!Absent(m, "tool_call_id")) {
      if (!m["tool_call_id"].is_string()) return Bad(at + ".tool_call_id", "must be a string");
      msg->set_tool_call_id(m["tool_call_id"].get<std::string>());
    }
    if (!Absent(m, "tool_calls")) {
      const json& calls = m["tool_calls"];
      if (!calls.is_array()) return Bad(at + ".tool_calls", "must be a list");
      for (size_t k = 0; k < calls.size(); ++k) {
        const json& c = calls[k];
        const std::string cat = absl::StrCat(at, ".tool_calls[", k, "]");
        if (!c.is_object() || !c.contains("function") || !c["function"].is_object()) {
          return Bad(cat, "must be an object with a 'function'");
        }
        const json& f = c["function"];
        v1::ToolCall* call = msg->add_tool_calls();
        if (c.contains("id") && c["id"].is_string()) call->set_id(c["id"].get<std::string>());
        call->set_type(c.contains("type") && c["type"].is_string() ? c["type"].get<std::string>()
                                                                    : "function");
        if (!f.contains("name") || !f["name"].is_string()) {
          return Bad(cat + ".function.name", "must be a string");
        }
        call->mutable_function()->set_name(f["name"].get<std::string>());
        if (f.contains("arguments")) {
          // OpenAI sends a JSON text; a client that sent an object gets it as JSON text.
          call->mutable_function()->set_arguments(
              f["arguments"].is_string()
                  ? f["arguments"].get<std::string>()
                  : ordered["messages"][i]["tool_calls"][k]["function"]["arguments"].dump(
                        -1, ' ', false, json::error_handler_t::replace));
        }
      }
    }
  }
  SPLITMOE_ASSIGN_OR_RETURN(bool add_generation_prompt,
                            GetBool(body, "add_generation_prompt", true));
  out.set_add_generation_prompt(add_generation_prompt);
  if (!Absent(body, "tools")) {
    if (!body["tools"].is_array()) return Bad("tools", "must be a list");
    if (!body["tools"].empty()) {
      out.set_tools_json(ordered["tools"].dump(-1, ' ', false, json::error_handler_t::replace));
    }
  }
  if (!Absent(body, "tool_choice")) {
    const json& choice = body["tool_choice"];
    if (!choice.is_string() || (choice != "none" && choice != "auto")) {
      return Bad("tool_choice",
                 "may be \"none\" or \"auto\" only: this server does not force tool calls");
    }
  }
  return out;
}

std::string RandomHex(uint64_t seed) {
  return absl::StrFormat("%016x%08x", Mix64(seed), static_cast<uint32_t>(Mix64(seed + 1)));
}

float Clamped(float logprob) {
  // JSON has no -inf; vLLM writes -9999.0 for a token the sampler excluded.
  return std::isfinite(logprob) ? logprob : -9999.0f;
}

}  // namespace

std::string Dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

absl::StatusOr<ApiRequest> ParseRequest(Endpoint endpoint, absl::string_view body_text,
                                        const Defaults& defaults, uint64_t random_seed) {
  if (JsonNesting(std::string_view(body_text.data(), body_text.size())) > kMaxNesting) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request body nests arrays and objects deeper than ", kMaxNesting));
  }
  const json body = json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    return absl::InvalidArgumentError("the request body is not valid JSON");
  }
  if (!body.is_object()) return absl::InvalidArgumentError("the request body must be an object");
  ApiRequest r;
  r.endpoint = endpoint;
  r.created = absl::ToUnixSeconds(absl::Now());
  r.id = absl::StrCat(endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-", RandomHex(random_seed));

  if (!Absent(body, "model")) {
    if (!body["model"].is_string()) return Bad("model", "must be a string");
    const std::string model = body["model"].get<std::string>();
    if (model != defaults.model_name) {
      return absl::NotFoundError(absl::StrCat("The model `", model,
                                              "` does not exist; this server serves `",
                                              defaults.model_name, "`"));
    }
  }
  SPLITMOE_ASSIGN_OR_RETURN(r.stream, GetBool(body, "stream", false));
  if (!Absent(body, "stream_options")) {
    const json& o = body["stream_options"];
    if (!o.is_object()) return Bad("stream_options", "must be an object");
    if (!r.stream) return Bad("stream_options", "is only allowed with stream: true");
    SPLITMOE_ASSIGN_OR_RETURN(r.include_usage, GetBool(o, "include_usage", false));
  }
  SPLITMOE_ASSIGN_OR_RETURN(int64_t n, GetInt(body, "n", 1, 1, 1 << 20));
  if (n != 1) return Bad("n", "must be 1: this server returns one choice per prompt");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t best_of, GetInt(body, "best_of", 1, 1, 1 << 20));
  if (best_of != 1) return Bad("best_of", "must be 1");
  if (!Absent(body, "user") && !body["user"].is_string()) return Bad("user", "must be a string");
  SPLITMOE_RETURN_IF_ERROR(Unsupported(body, "echo", false, ""));
  SPLITMOE_RETURN_IF_ERROR(Unsupported(body, "suffix", "", ""));
  SPLITMOE_RETURN_IF_ERROR(Unsupported(body, "presence_penalty", 0, "leave it 0"));
  SPLITMOE_RETURN_IF_ERROR(Unsupported(body, "frequency_penalty", 0, "leave it 0"));
  SPLITMOE_RETURN_IF_ERROR(Unsupported(body, "logit_bias", json::object(), ""));
  if (!Absent(body, "response_format")) {
    const json& f = body["response_format"];
    auto type = f.is_object() ? f.find("type") : f.end();
    if (!f.is_object() || type == f.end() || !type->is_string() || *type != "text") {
      return Bad("response_format", "may only be {\"type\": \"text\"}");
    }
  }

  // Sampling.
  SPLITMOE_ASSIGN_OR_RETURN(double temperature,
                            GetNumber(body, "temperature", defaults.temperature, 0.0, 100.0));
  SPLITMOE_ASSIGN_OR_RETURN(double top_p, GetNumber(body, "top_p", defaults.top_p, 0.0, 1.0));
  if (top_p <= 0.0) return Bad("top_p", "must be in (0, 1]");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t top_k, GetInt(body, "top_k", 0, -1, 1 << 30));
  if (top_k < 0) top_k = 0;  // vLLM: -1 is no limit
  uint64_t seed = Mix64(random_seed ^ 0x5eedULL);
  if (!Absent(body, "seed")) {
    const json& s = body["seed"];
    if (!s.is_number_integer()) return Bad("seed", "must be an integer");
    seed = s.is_number_unsigned() ? s.get<uint64_t>() : static_cast<uint64_t>(s.get<int64_t>());
  }

  // Stop conditions.
  int64_t max_tokens = endpoint == Endpoint::kChat ? 0 : defaults.completion_max_tokens;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  if (endpoint == Endpoint::kChat && !Absent(body, "max_completion_tokens")) {
    SPLITMOE_ASSIGN_OR_RETURN(max_tokens, GetInt(body, "max_completion_tokens", 0, 1, kIntMax));
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(max_tokens, GetInt(body, "max_tokens", max_tokens, 1, kIntMax));
  }
  std::vector<std::string> stop;
  if (!Absent(body, "stop")) {
    const json& s = body["stop"];
    if (s.is_string()) {
      stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      for (const json& x : s) {
        if (!x.is_string()) return Bad("stop", "must be a string or a list of strings");
        stop.push_back(x.get<std::string>());
      }
    } else {
      return Bad("stop", "must be a string or a list of strings");
    }
  }
  SPLITMOE_ASSIGN_OR_RETURN(bool ignore_eos, GetBool(body, "ignore_eos", false));
  v1::TokenIds stop_token_ids;
  if (!Absent(body, "stop_token_ids")) {
    if (!body["stop_token_ids"].is_array()) return Bad("stop_token_ids", "must be a list");
    SPLITMOE_ASSIGN_OR_RETURN(stop_token_ids, TokenIdsOf(body["stop_token_ids"], "stop_token_ids"));
  }

  // Logprobs: completions' `logprobs` is a count; chat's is a flag with `top_logprobs` beside.
  const int64_t kMax = engine::kMaxLogprobs;
  if (endpoint == Endpoint::kCompletions) {
    if (!Absent(body, "logprobs")) {
      SPLITMOE_ASSIGN_OR_RETURN(int64_t lp, GetInt(body, "logprobs", 0, 0, kMax));
      r.top_logprobs = static_cast<int32_t>(lp);
    }
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(bool lp, GetBool(body, "logprobs", false));
    SPLITMOE_ASSIGN_OR_RETURN(int64_t top, GetInt(body, "top_logprobs", 0, 0, kMax));
    if (!lp && !Absent(body, "top_logprobs") && top > 0) {
      return Bad("top_logprobs", "needs logprobs: true");
    }
    if (lp) r.top_logprobs = static_cast<int32_t>(top);
  }

  if (endpoint == Endpoint::kCompletions) {
    SPLITMOE_ASSIGN_OR_RETURN(r.generates, CompletionPrompts(body));
  } else {
    const nlohmann::ordered_json ordered =
        nlohmann::ordered_json::parse(body_text, nullptr, /*allow_exceptions=*/false);
    SPLITMOE_ASSIGN_OR_RETURN(v1::ChatMessages messages, ChatMessagesOf(body, ordered));
    r.generates.emplace_back();
    *r.generates.back().mutable_messages() = std::move(messages);
  }
  for (size_t i = 0; i < r.generates.size(); ++i) {
    v1::GenerateRequest& g = r.generates[i];
    g.set_request_id(r.generates.size() == 1 ? r.id : absl::StrCat(r.id, "-", i));
    g.mutable_sampling()->set_temperature(temperature);
    g.mutable_sampling()->set_top_p(top_p);
    g.mutable_sampling()->set_top_k(static_cast<int32_t>(top_k));
    g.mutable_sampling()->set_seed(seed);
    g.mutable_stop()->set_max_tokens(static_cast<int32_t>(max_tokens));
    g.mutable_stop()->set_context_max_tokens(max_tokens == 0);
    for (const std::string& s : stop) g.mutable_stop()->add_stop(s);
    *g.mutable_stop()->mutable_stop_token_ids() = stop_token_ids.ids();
    g.mutable_stop()->set_ignore_eos(ignore_eos);
    // The wire's `logprobs` counts alternatives and 0 means none: ask for one and show
    // top_logprobs of them.
    if (r.top_logprobs >= 0) g.set_logprobs(std::max<int32_t>(r.top_logprobs, 1));
  }
  return r;
}

ApiError ErrorFrom(absl::StatusCode code, absl::string_view message) {
  ApiError e;
  e.message = std::string(message);
  e.type = "invalid_request_error";
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      e.http_status = 400;
      break;
    case absl::StatusCode::kUnauthenticated:
      e.http_status = 401;
      e.type = "authentication_error";
      e.code = "invalid_api_key";
      break;
    case absl::StatusCode::kPermissionDenied:
      e.http_status = 403;
      e.type = "permission_error";
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      e.code = "model_not_found";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      e.type = "server_error";
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.http_status = 504;
      e.type = "server_error";
      break;
    case absl::StatusCode::kUnimplemented:
      e.http_status = 501;
      e.type = "server_error";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
  }
  return e;
}

std::string ErrorBody(const ApiError& e) {
  json error = {{"message", e.message},
                {"type", e.type},
                {"param", nullptr},
                {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
  return Dump(json{{"error", std::move(error)}});
}

ResponseBuilder::ResponseBuilder(const ApiRequest& request, std::string model,
                                 const tokenizer::Tokenizer* tokenizer)
    : endpoint_(request.endpoint),
      id_(request.id),
      created_(request.created),
      model_(std::move(model)),
      top_logprobs_(request.top_logprobs),
      include_usage_(request.include_usage),
      tokenizer_(tokenizer),
      choices_(request.generates.size()) {}

json ResponseBuilder::ChunkFrame() const {
  json frame = {{"id", id_},
                {"object", endpoint_ == Endpoint::kChat ? "chat.completion.chunk"
                                                        : "text_completion"},
                {"created", created_},
                {"model", model_}};
  if (include_usage_) frame["usage"] = nullptr;
  return frame;
}

json ResponseBuilder::LogprobsOf(Choice& choice, const v1::GenerateEvent& event) const {
  auto token_text = [&](int32_t id) -> std::string {
    if (tokenizer_ == nullptr) return absl::StrCat("token_id:", id);
    absl::StatusOr<std::string> text = tokenizer_->Decode({id}, false);
    return text.ok() ? *text : absl::StrCat("token_id:", id);
  };
  auto bytes_of = [](const std::string& s) {
    json b = json::array();
    for (unsigned char c : s) b.push_back(static_cast<int>(c));
    return b;
  };
  const size_t top = static_cast<size_t>(std::max(top_logprobs_, 0));
  if (endpoint_ == Endpoint::kChat) {
    json content = json::array();
    for (const v1::TokenLogprob& lp : event.logprobs()) {
      const std::string text = token_text(lp.token());
      json alternatives = json::array();
      for (int k = 0; k < lp.top_size() && static_cast<size_t>(k) < top; ++k) {
        const std::string alt = token_text(lp.top(k).token());
        alternatives.push_back({{"token", alt},
                                {"logprob", Clamped(lp.top(k).logprob())},
                                {"bytes", bytes_of(alt)}});
      }
      content.push_back({{"token", text},
                         {"logprob", Clamped(lp.logprob())},
                         {"bytes", bytes_of(text)},
                         {"top_logprobs", std::move(alternatives)}});
    }
    return json{{"content", std::move(content)}};
  }
  json out = {{"tokens", json::array()},
              {"token_logprobs", json::array()},
              {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  for (const v1::TokenLogprob& lp : event.logprobs()) {
    const std::string text = token_text(lp.token());
    out["tokens"].push_back(text);
    out["token_logprobs"].push_back(Clamped(lp.logprob()));
    json alternatives = json::object();
    for (int k = 0; k < lp.top_size() && static_cast<size_t>(k) < top; ++k) {
      alternatives[token_text(lp.top(k).token())] = Clamped(lp.top(k).logprob());
    }
    out["top_logprobs"].push_back(std::move(alternatives));
    out["text_offset"].push_back(choice.text_offset);
    choice.text_offset += static_cast<int64_t>(text.size());
  }
  return out;
}

std::vector<std::string> ResponseBuilder::Add(size_t index, const v1::GenerateEvent& event) {
  std::vector<std::string> chunks;
  if (index >= choices_.size()) return chunks;
  Choice& choice = choices_[index];
  const bool chat = endpoint_ == Endpoint::kChat;
  if (chat && !choice.started) {
    json frame = ChunkFrame();
    frame["choices"] = json::array({{{"index", index},
                                     {"delta", {{"role", "assistant"}, {"content", ""}}},
                                     {"logprobs", nullptr},
                                     {"finish_reason", nullptr}}});
    chunks.push_back(Dump(frame));
  }
  choice.started = true;
  choice.text += event.text();
  choice.completion_tokens += event.token_ids_size();
  json logprobs = nullptr;
  if (top_logprobs_ >= 0 && event.logprobs_size() > 0) {
    logprobs = LogprobsOf(choice, event);
    if (choice.logprobs.is_null()) {
      choice.logprobs = logprobs;
    } else if (chat) {
      for (const json& c : logprobs["content"]) choice.logprobs["content"].push_back(c);
    } else {
      for (const char* key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"}) {
        for (const json& v : logprobs[key]) choice.logprobs[key].push_back(v);
      }
    }
  }
  if (!event.text().empty() || !logprobs.is_null()) {
    json frame = ChunkFrame();
    json c = {{"index", index}, {"logprobs", logprobs}, {"finish_reason", nullptr}};
    if (chat) {
      c["delta"] = {{"content", event.text()}};
    } else {
      c["text"] = event.text();
    }
    frame["choices"] = json::array({std::move(c)});
    chunks.push_back(Dump(frame));
  }
  if (event.finished()) {
    choice.finish_reason =
        event.finish_reason() == v1::FINISH_REASON_LENGTH ? "length" : "stop";
    choice.prompt_tokens = event.usage().prompt_tokens();
    choice.completion_tokens = event.usage().completion_tokens();
    choice.cached_tokens = event.usage().cached_prompt_tokens();
    json frame = ChunkFrame();
    json c = {{"index", index}, {"logprobs", nullptr}, {"finish_reason", choice.finish_reason}};
    if (chat) {
      c["delta"] = json::object();
    } else {
      c["text"] = "";
    }
    frame["choices"] = json::array({std::move(c)});
    chunks.push_back(Dump(frame));
  }
  return chunks;
}

json ResponseBuilder::Usage() const {
  int64_t prompt = 0, completion = 0, cached = 0;
  for (const Choice& c : choices_) {
    prompt += c.prompt_tokens;
    completion += c.completion_tokens;
    cached += c.cached_tokens;
  }
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion},
          {"prompt_tokens_details", {{"cached_tokens", cached}}}};
}

std::string ResponseBuilder::UsageChunk() const {
  json frame = ChunkFrame();
  frame["choices"] = json::array();
  frame["usage"] = Usage();
  return Dump(frame);
}

std::string ResponseBuilder::Response() const {
  const bool chat = endpoint_ == Endpoint::kChat;
  json choices = json::array();
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    json choice = {{"index", i},
                   {"logprobs", c.logprobs},
                   {"finish_reason", c.finish_reason.empty() ? json(nullptr)
                                                             : json(c.finish_reason)}};
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = c.text;
    }
    choices.push_back(std::move(choice));
  }
  return Dump({{"id", id_},
               {"object", chat ? "chat.completion" : "text_completion"},
               {"created", created_},
               {"model", model_},
               {"choices", std::move(choices)},
               {"usage", Usage()}});
}

}  // namespace splitmoe::router::openai
