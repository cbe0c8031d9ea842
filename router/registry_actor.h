// RegistryActor: the router's registry actor, its control plane. Owns the WorkerRegistry
// (membership, heartbeats, health, the routing table, MoE statistics, the online bias), sweeps
// silent workers out of service on a timer (and closes a balancing window at every sweep), and
// after every change that makes a new routing-table version writes it to every watcher (the
// attention workers' WatchRoutingTable streams). It never touches the network itself: writes go
// to the streams' queues.
//
// After a start (or a restart) the router publishes no table until the table is complete (every
// expert has a live replica) or `settle` has passed, so workers that outlived a router keep
// their last table until the expert services have registered again.
//
//   runtime::Actor<RegistryActor> registry("registry", std::make_unique<RegistryActor>(...));
//   registry.ScheduleAfter(interval, SweepWorkers{});
//   registry.ref().Send(RegisterWorker{request, reply});
#ifndef SPLITMOE_ROUTER_REGISTRY_ACTOR_H_
#define SPLITMOE_ROUTER_REGISTRY_ACTOR_H_

#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>
#include <functional>
#include <mutex>

#include "common/runtime/actor.h"
#include "common/runtime/reply.h"
#include "router/generation_actor.h"
#include "router/readiness.h"
#include "router/registry.h"

namespace splitmoe::router {

struct RegisterWorker {
  v1::RegisterRequest request;
  runtime::Reply<v1::RegisterResponse> reply;
};
struct WorkerHeartbeat {
  v1::HeartbeatRequest request;
  runtime::Reply<v1::HeartbeatResponse> reply;
};
struct DeregisterWorker {
  std::string worker_id;
  runtime::Reply<void> reply;
};
struct GetClusterStatus {
  runtime::Reply<v1::ClusterStatusResponse> reply;
};
// Timer: take workers that stopped heartbeating out of service, close the balancing window,
// then schedule the next sweep.
struct SweepWorkers {};
// A routing-table watcher: `write` queues one table and returns false once the stream is gone
// (it is then dropped). Called on the actor's thread; must not block.
struct AddTableWatcher {
  std::function<bool(const v1::RoutingTable&)> write;
};
// Registry.Attach: a registered worker's liveness stream. Unknown worker: the stream is finished
// NOT_FOUND. `finish` ends the stream with a status (called on the actor's thread).
struct AttachWorker {
  std::string worker_id;
  std::function<void(grpc::Status)> finish;
};
// The worker's Attach stream ended (its process died or its connection broke).
struct WorkerConnectionLost {
  std::string worker_id;
};
// EPLB: compute a placement and (unless a dry run) start loading it (Registry.Rebalance).
struct RebalanceExperts {
  v1::RebalanceRequest request;
  runtime::Reply<v1::RebalanceResponse> reply;
};

// The routing status as of the registry actor's last sweep, for readers off its thread (the
// metrics). Thread-safe.
class RoutingSnapshot {
 public:
  void Set(v1::RoutingStatus status) {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = std::move(status);
  }
  v1::RoutingStatus Get() const {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }

 private:
  mutable std::mutex mu_;
  v1::RoutingStatus status_;
};

class RegistryActor {
 public:
  using Message = std::variant<RegisterWorker, WorkerHeartbeat, DeregisterWorker, GetClusterStatus,
                               SweepWorkers, AddTableWatcher, RebalanceExperts, AttachWorker,
                               WorkerConnectionLost>;

  // `generation` (may be empty) receives the healthy prefill and decode workers after every
  // change; `requests_in_flight` (may be null) is the front door's gauge for ClusterStatus.
  RegistryActor(WorkerRegistry registry, absl::Duration sweep_interval, absl::Duration settle,
                runtime::ActorRef<GenerationActor::Message> generation = {},
                std::shared_ptr<FrontDoorGauges> gauges = nullptr,
                absl::Time now = absl::Now())
      : registry_(std::move(registry)),
        sweep_interval_(sweep_interval),
        settle_until_(now + settle),
        generation_(std::move(generation)),
        gauges_(std::move(gauges)) {}

  void Handle(RegisterWorker m);
  void Handle(WorkerHeartbeat m);
  void Handle(DeregisterWorker m);
  void Handle(GetClusterStatus m);
  void Handle(SweepWorkers m, runtime::Context<Message>& ctx);
  void Handle(AddTableWatcher m);
  void Handle(RebalanceExperts m);
  void Handle(AttachWorker m);
  void Handle(WorkerConnectionLost m);

  // Where the actor reports readiness after every change (set before the actor starts).
  void set_readiness(std::shared_ptr<Readiness> readiness) { readiness_ = std::move(readiness); }
  // Where the actor leaves the routing status at every sweep (set before the actor starts).
  void set_routing_snapshot(std::shared_ptr<RoutingSnapshot> snapshot) {
    routing_snapshot_ = std::move(snapshot);
  }

  // The table watchers receive (for tests).
  const v1::RoutingTable& table() const { return registry_.table(); }
  bool publishing() const { return settled_; }

 private:
  // A new table version (if any) to every watcher, once settled.
  void PublishTable(absl::Time now);
  void PublishServing();
  void UpdateReadiness();

  WorkerRegistry registry_;
  absl::Duration sweep_interval_;
  absl::Time settle_until_;
  bool settled_ = false;
  runtime::ActorRef<GenerationActor::Message> generation_;
  std::shared_ptr<FrontDoorGauges> gauges_;
  std::shared_ptr<Readiness> readiness_;
  std::shared_ptr<RoutingSnapshot> routing_snapshot_;
  std::vector<std::function<bool(const v1::RoutingTable&)>> watchers_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_REGISTRY_ACTOR_H_
