// The experts actor and its faces. Each ExpertBatch arriving — on an attention worker's
// long-lived ExpertCompute stream (gRPC) or as a UCX active message (UcxExpertServer) — goes
// through the ExpertIngress, which counts it and makes it a ComputeExpertBatch message to the
// experts actor; the actor owns the ExpertShard, computes the partial sums on its own thread and
// replies. Neither the gRPC handler nor the UCX progress thread computes or blocks.
//
//   // clang-format off
//   runtime::Actor<ExpertsActor> actor("experts", std::make_unique<ExpertsActor>(std::move(shard)));
//   ExpertIngress ingress(actor.ref());
//   ExpertComputeService service(&ingress);
//   SPLITMOE_ASSIGN_OR_RETURN(auto server, rpc::StartServer(listen, {&service}));
//   SPLITMOE_ASSIGN_OR_RETURN(auto ucx, UcxExpertServer::Start(&ingress, "expert-0"));
//   // clang-format on
#ifndef SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
#define SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <variant>

#include "absl/time/time.h"

#include "common/runtime/actor.h"
#include "common/runtime/reply.h"
#include "common/transfer/ucx_transport.h"
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

// Where batches enter, whatever carried them: counts them (the heartbeat and the drain read the
// counters from any thread) and hands them to the experts actor.
class ExpertIngress {
 public:
  explicit ExpertIngress(runtime::ActorRef<ExpertsActor::Message> experts)
      : experts_(std::move(experts)) {}
  // Sends `batch` to the actor; `answer` runs exactly once, on the actor's thread, with its
  // result (an error result when the actor has stopped). Never blocks.
  void Submit(v1::ExpertBatch batch, std::function<void(v1::ExpertResult)> answer);

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

class ExpertComputeService final : public v1::ExpertCompute::CallbackService {
 public:
  explicit ExpertComputeService(ExpertIngress* ingress) : ingress_(ingress) {}
  grpc::ServerBidiReactor<v1::ExpertBatch, v1::ExpertResult>* Compute(
      grpc::CallbackServerContext* context) override;

 private:
  ExpertIngress* ingress_;
};

// The UCX face (expert_plane/ucx_expert.h has the other end): a UcxTransport whose messages
// tagged as batches go to the ingress; each answer goes back on the endpoint its batch came by.
// A message that is not a batch is dropped and counted (the sender's deadline fails it over).
class UcxExpertServer {
 public:
  // `ingress` must outlive the server. Unavailable when UCX cannot start.
  // `busy_poll`: TransportOptions::busy_poll_us of its progress thread.
  static absl::StatusOr<std::unique_ptr<UcxExpertServer>> Start(ExpertIngress* ingress,
                                                                absl::string_view name,
                                                                absl::Duration busy_poll);
  // Stops the transport: answers not yet sent are dropped (their senders fail over).
  ~UcxExpertServer();
  // What attention workers connect to (RegisterRequest.ucx_worker_address).
  const std::string& WorkerAddress() const { return transport_->WorkerAddress(); }
  uint64_t malformed() const { return malformed_.load(); }
  transfer::TransportStats Stats() const { return transport_->Stats(); }

 private:
  UcxExpertServer() = default;
  void OnMessage(transfer::Message m);  // progress thread
  ExpertIngress* ingress_ = nullptr;
  std::unique_ptr<transfer::UcxTransport> transport_;
  std::atomic<uint64_t> malformed_{0};
};

}  // namespace splitmoe::expert_service

#endif  // SPLITMOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
