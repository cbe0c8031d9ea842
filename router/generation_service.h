// The public Generation service, served by the router. Handlers validate and tokenise on the
// gRPC thread (stateless work with the immutable config and tokenizer) and post the request to
// the generation actor, which owns it from then on; Tokenize, Detokenize and ModelInfo are
// answered from the immutable model data directly.
#ifndef SPLITMOE_ROUTER_GENERATION_SERVICE_H_
#define SPLITMOE_ROUTER_GENERATION_SERVICE_H_

#include <atomic>
#include <string>
#include <vector>

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

class GenerationService final : public v1::Generation::CallbackService {
 public:
  // `tokenizer` may be null (token-id prompts only); `config_json` is returned by ModelInfo.
  GenerationService(const model::ModelConfig& config, const tokenizer::Tokenizer* tokenizer,
                    std::string model_name, std::string config_json,
                    runtime::ActorRef<GenerationActor::Message> actor)
      : config_(config),
        tokenizer_(tokenizer),
        model_name_(std::move(model_name)),
        config_json_(std::move(config_json)),
        actor_(std::move(actor)) {}

  grpc::ServerWriteReactor<v1::GenerateEvent>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
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
  runtime::ActorRef<GenerationActor::Message> actor_;
  std::atomic<uint64_t> next_serial_{1};
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_GENERATION_SERVICE_H_
