#include "router/generation_service.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/impl/codegen/proto_utils.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/chat/chat_template.h"
#include "nlohmann/json.hpp"
#include "common/base/json_text.h"
#include "common/base/utf8.h"
#include "common/base/status_macros.h"
#include "common/engine/request_check.h"
#include "common/engine/sampler.h"
#include "common/rpc/security.h"
#include "common/rpc/rpc.h"
#include "router/router_metrics.h"

namespace splitmoe::router {
namespace {

constexpr size_t kMaxRequestIdBytes = 256;

// Strictly well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF): what
// protobuf requires of a proto3 string.
bool IsValidUtf8(absl::string_view s) { return utf8::FindInvalidUtf8(s) == utf8::kAllValid; }

// The first string field of `fields` (the wire format of a `type` message, read without any
// checks) that is not valid UTF-8, as a dotted path ("text", "stop.stop"); empty when none is.
std::string FirstInvalidUtf8Field(const google::protobuf::Descriptor* type,
                                  const google::protobuf::UnknownFieldSet& fields) {
  using google::protobuf::FieldDescriptor;
  for (int i = 0; i < fields.field_count(); ++i) {
    const google::protobuf::UnknownField& f = fields.field(i);
    if (f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) continue;
    const FieldDescriptor* field = type->FindFieldByNumber(f.number());
    if (field == nullptr) continue;
    if (field->type() == FieldDescriptor::TYPE_STRING) {
      if (!IsValidUtf8(f.length_delimited())) return field->name();
    } else if (field->type() == FieldDescriptor::TYPE_MESSAGE) {
      google::protobuf::UnknownFieldSet nested;
      if (!nested.ParseFromString(f.length_delimited())) continue;  // the real parse says so
      std::string inner = FirstInvalidUtf8Field(field->message_type(), nested);
      if (!inner.empty()) return absl::StrCat(field->name(), ".", inner);
    }
  }
  return "";
}

}  // namespace

absl::Status ParseRawRequest(const grpc::ByteBuffer& raw, google::protobuf::Message* request) {
  const std::string& type = request->GetDescriptor()->name();
  std::vector<grpc::Slice> slices;
  if (!raw.Dump(&slices).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("request is not a valid ", type, ": its bytes cannot be read"));
  }
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  // Strings first, on a parse that checks nothing: protobuf's own parser refuses invalid UTF-8
  // without saying where (and logs a line per request, which a client could flood).
  google::protobuf::UnknownFieldSet fields;
  if (fields.ParseFromString(bytes)) {
    const std::string bad = FirstInvalidUtf8Field(request->GetDescriptor(), fields);
    if (!bad.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("request is not a valid ", type, ": field '", bad,
                       "' is not valid UTF-8 (strings must be valid UTF-8)"));
    }
  }
  if (!request->ParseFromString(bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request is not a valid ", type,
        ": the bytes do not parse as one (malformed wire format or a field of the wrong type; "
        "strings must be valid UTF-8)"));
  }
  return absl::OkStatus();
}

int32_t EffectiveMaxTokens(const v1::GenerateRequest& r, size_t prompt_tokens,
                           const model::ModelConfig& config) {
  if (r.stop().max_tokens() != 0 || !r.stop().context_max_tokens()) return r.stop().max_tokens();
  // What the context leaves (at least 1, so that a full prompt is refused by the check naming
  // the context rather than by one about max_tokens).
  const int64_t left = config.max_position_embeddings - static_cast<int64_t>(prompt_tokens);
  return static_cast<int32_t>(std::clamp<int64_t>(left, 1, std::numeric_limits<int32_t>::max()));
}

absl::StatusOr<std::string> ChatPromptText(const v1::ChatMessages& chat,
                                           const tokenizer::Tokenizer& tokenizer) {
  if (tokenizer.chat_template().empty()) {
    return absl::InvalidArgumentError(
        "the model has no chat template (tokenizer_config.json's chat_template): send text or "
        "token_ids");
  }
  if (chat.messages().empty()) return absl::InvalidArgumentError("messages is empty");
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  for (const v1::ChatMessage& m : chat.messages()) {
    nlohmann::ordered_json message = {{"role", m.role()}};
    message["content"] = m.has_content() ? nlohmann::ordered_json(m.content()) : nlohmann::ordered_json(nullptr);
    if (m.tool_calls_size() > 0) {
      nlohmann::ordered_json calls = nlohmann::ordered_json::array();
      for (const v1::ToolCall& c : m.tool_calls()) {
        calls.push_back({{"id", c.id()},
                         {"type", c.type().empty() ? "function" : c.type()},
                         {"function",
                          {{"name", c.function().name()},
                           {"arguments", c.function().arguments()}}}});
      }
      message["tool_calls"] = std::move(calls);
    }
    if (!m.tool_call_id().empty()) message["tool_call_id"] = m.tool_call_id();
    if (!m.name().empty()) message["name"] = m.name();
    messages.push_back(std::move(message));
  }
  chat::ChatRenderOptions options;
  options.add_generation_prompt =
      !chat.has_add_generation_prompt() || chat.add_generation_prompt();
  auto special = [&](int32_t id) -> std::string {
    if (id < 0) return "";
    absl::StatusOr<std::string> text = tokenizer.Decode({id}, false);
    return text.ok() ? *text : "";
  };
  options.bos_token = special(tokenizer.bos_id());
  options.eos_token = special(tokenizer.eos_id());
  if (!chat.tools_json().empty()) {
    if (JsonNesting(chat.tools_json()) > 64) {
      return absl::InvalidArgumentError("messages.tools_json nests deeper than 64 levels");
    }
    options.tools = nlohmann::ordered_json::parse(chat.tools_json(), nullptr, false);
    if (options.tools.is_discarded() || !options.tools.is_array()) {
      return absl::InvalidArgumentError("messages.tools_json is not a JSON list");
    }
  }
  absl::StatusOr<std::string> text =
      chat::RenderChat(tokenizer.chat_template(), messages, options);
  if (!text.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the chat template refused the conversation: ", text.status().message()));
  }
  return text;
}

absl::StatusOr<std::vector<int32_t>> ValidateGenerateRequest(
    const v1::GenerateRequest& r, const model::ModelConfig& config,
    const tokenizer::Tokenizer* tokenizer) {
  if (r.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id longer than ", kMaxRequestIdBytes, " bytes"));
  }
  std::vector<int32_t> prompt;
  switch (r.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (r.text().empty()) return absl::InvalidArgumentError("empty prompt text");
      if (tokenizer == nullptr) {
        return absl::InvalidArgumentError(
            "text prompts need a tokenizer, and the model directory has none: send token_ids");
      }
      absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode(r.text(), true);
      if (!ids.ok()) return absl::InvalidArgumentError(ids.status().message());
      prompt = std::move(*ids);
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      prompt.assign(r.token_ids().ids().begin(), r.token_ids().ids().end());
      break;
    case v1::GenerateRequest::kMessages: {
      if (tokenizer == nullptr) {
        return absl::InvalidArgumentError(
            "messages need a tokenizer and a chat template, and the model directory has no "
            "tokenizer: send token_ids");
      }
      SPLITMOE_ASSIGN_OR_RETURN(std::string text, ChatPromptText(r.messages(), *tokenizer));
      absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode(text, false);
      if (!ids.ok()) return absl::InvalidArgumentError(ids.status().message());
      prompt = std::move(*ids);
      if (prompt.empty()) return absl::InvalidArgumentError("the chat template rendered nothing");
      break;
    }
    default:
      return absl::InvalidArgumentError("no prompt: set text, token_ids or messages");
  }
  const v1::SamplingParams& s = r.sampling();
  if (!std::isfinite(s.temperature()) || !std::isfinite(s.top_p())) {
    return absl::InvalidArgumentError("temperature and top_p must be finite");
  }
  const engine::SamplingParams sampling{.temperature = s.temperature(),
                                        .top_p = s.top_p() == 0 ? 1.0 : s.top_p(),
                                        .top_k = s.top_k(),
                                        .seed = s.seed()};
  const std::vector<std::string> stop(r.stop().stop().begin(), r.stop().stop().end());
  engine::RequestShape shape;
  shape.prompt = prompt;
  shape.max_tokens = EffectiveMaxTokens(r, prompt.size(), config);
  shape.max_tokens_name = "stop.max_tokens";
  shape.logprobs = r.logprobs();
  shape.prompt_logprobs = r.prompt_logprobs();
  shape.stop = stop;
  shape.stop_token_ids = absl::MakeConstSpan(r.stop().stop_token_ids().data(),
                                             static_cast<size_t>(r.stop().stop_token_ids_size()));
  shape.sampling = &sampling;
  shape.has_tokenizer = tokenizer != nullptr;
  SPLITMOE_RETURN_IF_ERROR(engine::CheckRequest(config, shape));
  // On the wire 0 means none: a negative count is malformed, not "none" as in the engine.
  if (r.logprobs() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs must be in [0, ", engine::kMaxLogprobs, "], got ", r.logprobs()));
  }
  if (r.prompt_logprobs() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("prompt_logprobs must be in [0, ",
                                                   engine::kMaxLogprobs, "], got ",
                                                   r.prompt_logprobs()));
  }
  return prompt;
}

std::string GenerationService::ClientOf(const grpc::CallbackServerContext& ctx) {
  const auto& metadata = ctx.client_metadata();
  if (rpc::ApiKeysRequired()) {
    auto it = metadata.find("authorization");
    if (it != metadata.end()) return absl::StrCat("key ", std::string(it->second.data(), it->second.size()));
  }
  // "ipv4:10.0.0.7:51234", "ipv6:[::1]:51234": the host, without the port. The HTTP front
  // door calls in process and names its client's host (a remote peer cannot claim to).
  const std::string peer = ctx.peer();
  if (absl::StartsWith(peer, "inproc")) {
    auto it = metadata.find("x-splitmoe-http-client");
    if (it != metadata.end()) {
      return absl::StrCat("http ", std::string(it->second.data(), it->second.size()));
    }
  }
  const size_t colon = peer.rfind(':');
  return colon == std::string::npos ? peer : peer.substr(0, colon);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerationService::Generate(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw) {
  const uint64_t serial = next_serial_.fetch_add(1);
  runtime::ActorRef<GenerationActor::Message> actor = actor_;
  if (grpc::Status key = rpc::CheckApiKey(ctx); !key.ok()) {
    auto [reactor, stream] = rpc::ServerStream<v1::GenerateEvent>::CreateRaw([] {});
    CountRequestError(key.error_code());
    stream->Finish(std::move(key));
    return reactor;
  }
  // The client's ticket: counted while the stream lives (the ticket goes with the stream's
  // cancel callback, which the stream drops when it ends).
  const std::string client = ClientOf(*ctx);
  int open = 0;
  {
    std::lock_guard<std::mutex> lock(streams_->mu);
    open = streams_->open[client];
    if (open < max_streams_per_client_) ++streams_->open[client];
  }
  if (open >= max_streams_per_client_) {
    auto [reactor, stream] = rpc::ServerStream<v1::GenerateEvent>::CreateRaw([] {});
    CountRequestError(grpc::StatusCode::RESOURCE_EXHAUSTED);
    stream->Finish(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("this client has ", open, " Generate streams open, the most allowed "
                     "(--max-streams-per-client ", max_streams_per_client_, ")")));
    return reactor;
  }
  auto ticket = std::shared_ptr<void>(nullptr, [counts = streams_, client](void*) {
    std::lock_guard<std::mutex> lock(counts->mu);
    if (--counts->open[client] <= 0) counts->open.erase(client);
  });
  auto [reactor, stream] = rpc::ServerStream<v1::GenerateEvent>::CreateRaw(
      [actor, serial, ticket] { actor.Send(ClientGone{serial}); });
  v1::GenerateRequest request;
  absl::Status parsed = ParseRawRequest(*raw, &request);
  if (!parsed.ok()) {
    CountRequestError(grpc::StatusCode::INVALID_ARGUMENT);
    stream->Finish(rpc::ToGrpcStatus(parsed));
    return reactor;
  }
  absl::StatusOr<std::vector<int32_t>> prompt =
      ValidateGenerateRequest(request, config_, tokenizer_);
  if (!prompt.ok()) {
    CountRequestError(static_cast<grpc::StatusCode>(prompt.status().code()));
    stream->Finish(rpc::ToGrpcStatus(prompt.status()));
    return reactor;
  }
  request.mutable_stop()->set_max_tokens(EffectiveMaxTokens(request, prompt->size(), config_));
  if (!actor_.Send(
          NewGeneration{serial, std::move(request), std::move(*prompt), absl::Now(), stream})) {
    CountRequestError(grpc::StatusCode::UNAVAILABLE);
    stream->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "router is stopping"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* ctx,
                                                      const grpc::ByteBuffer* raw,
                                                      grpc::ByteBuffer* raw_response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefusePublic(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  v1::TokenizeRequest request;
  absl::Status parsed = ParseRawRequest(*raw, &request);
  if (!parsed.ok()) {
    reactor->Finish(rpc::ToGrpcStatus(parsed));
    return reactor;
  }
  if (tokenizer_ == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                 "the model directory has no tokenizer"));
    return reactor;
  }
  absl::StatusOr<std::vector<int32_t>> ids =
      tokenizer_->Encode(request.text(), request.add_special_tokens());
  if (!ids.ok()) {
    reactor->Finish(rpc::ToGrpcStatus(ids.status()));
    return reactor;
  }
  v1::TokenizeResponse response;
  *response.mutable_ids() = {ids->begin(), ids->end()};
  bool own_buffer = false;
  grpc::Status serialised = grpc::SerializationTraits<v1::TokenizeResponse>::Serialize(
      response, raw_response, &own_buffer);
  reactor->Finish(serialised);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Detokenize(grpc::CallbackServerContext* ctx,
                                                        const v1::DetokenizeRequest* request,
                                                        v1::DetokenizeResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefusePublic(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (tokenizer_ == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                 "the model directory has no tokenizer"));
    return reactor;
  }
  if (absl::Status s = engine::CheckTokenIds(
          config_, absl::MakeConstSpan(request->ids().data(), static_cast<size_t>(request->ids_size())),
          "token id");
      !s.ok()) {
    reactor->Finish(rpc::ToGrpcStatus(s));
    return reactor;
  }
  std::vector<int32_t> ids(request->ids().begin(), request->ids().end());
  absl::StatusOr<std::string> text = tokenizer_->Decode(ids, request->skip_special_tokens());
  if (text.ok()) response->set_text(std::move(*text));
  reactor->Finish(rpc::ToGrpcStatus(text.status()));
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::ModelInfo(grpc::CallbackServerContext* ctx,
                                                       const v1::ModelInfoRequest* /*request*/,
                                                       v1::ModelInfoResponse* response) {
  const model::ModelConfig& c = config_;
  response->set_model(model_name_);
  response->set_vocab_size(static_cast<int32_t>(c.vocab_size));
  response->set_hidden_size(static_cast<int32_t>(c.hidden_size));
  response->set_num_hidden_layers(static_cast<int32_t>(c.num_hidden_layers));
  response->set_max_position_embeddings(static_cast<int32_t>(c.max_position_embeddings));
  response->set_n_routed_experts(static_cast<int32_t>(c.n_routed_experts));
  response->set_num_experts_per_tok(static_cast<int32_t>(c.num_experts_per_tok));
  response->set_latent_dim(static_cast<int32_t>(c.latent_dim()));
  response->set_bos_token_id(static_cast<int32_t>(c.bos_token_id));
  response->set_eos_token_id(static_cast<int32_t>(c.eos_token_id));
  response->set_config_json(config_json_);
  if (grpc::ServerUnaryReactor* refused = rpc::RefusePublic(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace splitmoe::router
