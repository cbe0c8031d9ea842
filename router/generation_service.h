// The public Generation service, served by the router. Handlers validate and tokenise on the
// gRPC thread (stateless work with the immutable config and tokenizer) and post the request to
// the generation actor, which owns it from then on; Tokenize, Detokenize and ModelInfo are
// answered from the immutable model data directly.
//
// Generate and Tokenize, whose requests carry text, are registered raw: the handler parses the
// bytes itself, so that a request gRPC's own deserialisation would drop with UNIMPLEMENTED and
// no message (proto3 refuses a string field holding invalid UTF-8) is answered INVALID_ARGUMENT
// naming the field.
//
// A client may hold at most `max_streams_per_client` Generate streams at once (the router's
// --max-streams-per-client, which also caps each HTTP/2 connection): a client is its API key
// where keys are asked for, else its host, so opening more connections does not raise the cap.
// One more is RESOURCE_EXHAUSTED at once.
#ifndef SPLITMOE_ROUTER_GENERATION_SERVICE_H_
#define SPLITMOE_ROUTER_GENERATION_SERVICE_H_

#include <google/protobuf/message.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model/config.h"
#include "common/runtime/actor.h"
#include "common/tokenizer/tokenizer.h"
#include "router/generation_actor.h"
#include "splitmoe/v1/generation.grpc.pb.h"

namespace splitmoe::router {

// Checks a request against the model (prompt, ids, context, sampling, stop conditions, logprob
// counts) and returns its prompt token ids; InvalidArgument with the reason otherwise.
absl::StatusOr<std::vector<int32_t>> ValidateGenerateRequest(const v1::GenerateRequest& request,
                                                             const model::ModelConfig& config,
                                                             const tokenizer::Tokenizer* tokenizer);

// The number of tokens `r` may generate: its stop.max_tokens, or with max_tokens 0 and
// stop.context_max_tokens what the context leaves after the prompt.
int32_t EffectiveMaxTokens(const v1::GenerateRequest& r, size_t prompt_tokens,
                           const model::ModelConfig& config);

// A conversation rendered through the tokenizer's chat template (with its BOS and EOS texts and
// the tools), ready to be tokenised without special tokens. InvalidArgument when the model has
// no template or the template refuses the conversation.
absl::StatusOr<std::string> ChatPromptText(const v1::ChatMessages& chat,
                                           const tokenizer::Tokenizer& tokenizer);

// Parses a request received raw; InvalidArgument "request is not a valid <Type>: ..." naming
// the first string field that is not valid UTF-8, or saying the bytes are not the message.
absl::Status ParseRawRequest(const grpc::ByteBuffer& raw, google::protobuf::Message* request);

// The callback service with Generate and Tokenize taking raw bytes (see above).
using GenerationServiceBase = v1::Generation::WithRawCallbackMethod_Generate<
    v1::Generation::WithRawCallbackMethod_Tokenize<v1::Generation::WithCallbackMethod_Detokenize<
        v1::Generation::WithCallbackMethod_ModelInfo<v1::Generation::Service>>>>;

class GenerationService final : public GenerationServiceBase {
 public:
  // `tokenizer` may be null (token-id prompts only); `config_json` is returned by ModelInfo.
  GenerationService(const model::ModelConfig& config, const tokenizer::Tokenizer* tokenizer,
                    std::string model_name, std::string config_json,
                    runtime::ActorRef<GenerationActor::Message> actor,
                    int max_streams_per_client = 1024)
      : config_(config),
        tokenizer_(tokenizer),
        model_name_(std::move(model_name)),
        config_json_(std::move(config_json)),
        actor_(std::move(actor)),
        streams_(std::make_shared<StreamCounts>()),
        max_streams_per_client_(max_streams_per_client) {}

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* ctx,
                                                       const grpc::ByteBuffer* raw) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                     grpc::ByteBuffer* raw_response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* ModelInfo(grpc::CallbackServerContext* ctx,
                                      const v1::ModelInfoRequest* request,
                                      v1::ModelInfoResponse* response) override;

 private:
  const model::ModelConfig& config_;
  const tokenizer::Tokenizer* tokenizer_;
  std::string model_name_;
  std::string config_json_;
  // Who `ctx`'s caller is, for the stream cap: its API key, else its host.
  static std::string ClientOf(const grpc::CallbackServerContext& ctx);

  // Open Generate streams per client; shared with the streams' tickets, which may outlive the
  // service by a moment.
  struct StreamCounts {
    std::mutex mu;
    std::map<std::string, int> open;
  };
  runtime::ActorRef<GenerationActor::Message> actor_;
  std::atomic<uint64_t> next_serial_{1};
  std::shared_ptr<StreamCounts> streams_;
  const int max_streams_per_client_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_GENERATION_SERVICE_H_
