// The experts actor and its gRPC face. Each ExpertBatch arriving on an attention worker's
// long-lived ExpertCompute stream becomes a ComputeExpertBatch message to the experts actor, which owns the
// ExpertShard, computes the partial sums on its own thread and replies; the gRPC handler never
// computes or blocks.
//
//   runtime::Actor<ExpertsActor> actor("experts",
//   std::make_unique<ExpertsActor>(std::move(shard))); ExpertComputeService service(actor.ref());
//   SPLITMOE_ASSIGN_OR_RETURN(auto server, rpc::StartServer(listen, {&service}));
#ifndef SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
#define SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_

#include <atomic>
#include <map>
#include <memory>
#include <variant>

#include "absl/time/time.h"

#include "common/runtime/actor.h"
#include "common/runtime/reply.h"
#include "expert_service/expert_shard.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::expert_service {

// Runs one batch on the shard (the experts actor's handler): decodes, computes, encodes in the
// batch's wire dtype. Errors go into ExpertResult.error, so the stream stays up.
v1::ExpertResult ComputeBatch(const ExpertShard& shard, const v1::ExpertBatch& batch);

// Command: compute one batch (with the experts of its placement) and answer with its partial
// sums.
struct ComputeExpertBatch {
  v1::ExpertBatch batch;
  runtime::Reply<v1::ExpertResult> reply;
};
// The experts of an EPLB placement, loaded off the actor (run_expert's loader): from now on
// batches planned with `placement` are computed with them.
struct InstallPlacement {
  uint64_t placement = 0;
  std::shared_ptr<const ExpertShard> shard;
};
// A placement no longer in force nor next: its experts go (never the default, 0) — unless a
// batch used it within `idle` (an attention worker that has not seen the new table yet, e.g.
// while the router is away). The reply says whether it is gone.
struct RetirePlacement {
  uint64_t placement = 0;
  absl::Duration idle = absl::Seconds(2);
  runtime::Reply<bool> reply;
};

// The experts actor: owns the shards, one per placement it holds (0: the default contiguous
// one, always kept, so a restarted router that knows no placement is served at once).
class ExpertsActor {
 public:
  using Message = std::variant<ComputeExpertBatch, InstallPlacement, RetirePlacement>;
  explicit ExpertsActor(std::unique_ptr<ExpertShard> shard) {
    shards_[0] = std::shared_ptr<const ExpertShard>(std::move(shard));
  }
  void Handle(ComputeExpertBatch m);
  void Handle(InstallPlacement m) { shards_[m.placement] = std::move(m.shard); }
  void Handle(RetirePlacement m);

 private:
  std::map<uint64_t, std::shared_ptr<const ExpertShard>> shards_;
  std::map<uint64_t, absl::Time> last_used_;  // by placement
};

class ExpertComputeService final : public v1::ExpertCompute::CallbackService {
 public:
  explicit ExpertComputeService(runtime::ActorRef<ExpertsActor::Message> experts)
      : experts_(std::move(experts)) {}
  grpc::ServerBidiReactor<v1::ExpertBatch, v1::ExpertResult>* Compute(
      grpc::CallbackServerContext* context) override;

  uint64_t batches() const { return batches_.load(); }
  // Token-expert assignments received, and batches received but not answered yet.
  uint64_t assignments() const { return assignments_.load(); }
  int64_t in_flight() const { return in_flight_.load(); }
  absl::Time last_batch() const { return absl::FromUnixMicros(last_batch_us_.load()); }

 private:
  runtime::ActorRef<ExpertsActor::Message> experts_;
  std::atomic<uint64_t> batches_{0}, assignments_{0};
  std::atomic<int64_t> in_flight_{0}, last_batch_us_{0};
};

}  // namespace splitmoe::expert_service

#endif  // SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
