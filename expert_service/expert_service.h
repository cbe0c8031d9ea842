// ExpertComputeService: the gRPC face of an expert service. Each ExpertBatch arriving on a
// router's long-lived ExpertCompute stream is posted as a message to the experts actor, which
// owns the ExpertShard, computes the partial sums on its own thread and replies; the gRPC
// handler itself never computes or blocks. Create after the actor; the service only holds the
// actor's post function.
//
//   ExpertsActor actor(std::move(shard));
//   ExpertComputeService service(actor.poster(), actor.config().hidden_size);
//   SPLITMOE_ASSIGN_OR_RETURN(auto server, rpc::StartServer(listen, {&service}));
#ifndef SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
#define SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_

#include <atomic>
#include <functional>
#include <memory>

#include "expert_service/expert_shard.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::expert_service {

// Runs one batch on the shard (the experts actor's handler): decodes, computes, encodes in the
// batch's wire dtype. Errors go into ExpertResult.error, so the stream stays up.
v1::ExpertResult ComputeBatch(const ExpertShard& shard, const v1::ExpertBatch& batch);

// Posts a task to the actor that owns the shard; false once the actor has stopped.
using PostFn = std::function<bool(std::function<void()>)>;

class ExpertComputeService final : public v1::ExpertCompute::CallbackService {
 public:
  ExpertComputeService(const ExpertShard* shard, PostFn post)
      : shard_(shard), post_(std::move(post)) {}
  grpc::ServerBidiReactor<v1::ExpertBatch, v1::ExpertResult>* Compute(
      grpc::CallbackServerContext* context) override;

  uint64_t batches() const { return batches_.load(); }

 private:
  const ExpertShard* shard_;  // read only on the actor's thread
  PostFn post_;
  std::atomic<uint64_t> batches_{0};
};

}  // namespace splitmoe::expert_service

#endif  // SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
