// RegistryActor: the router's registry actor. Owns the WorkerRegistry (membership, heartbeats,
// health), sweeps silent workers out of service on a timer, and after every membership change
// connects to new expert services and sends the new placement to the expert-router actor.
// Connecting blocks this actor briefly (bounded by ExpertClient::Connect's timeout), never the
// expert router.
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

#include "common/runtime/actor.h"
#include "common/runtime/reply.h"
#include "router/expert_client.h"
#include "router/expert_router.h"
#include "router/generation_actor.h"
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
// Timer: take workers that stopped heartbeating out of service, then schedule the next sweep.
struct SweepWorkers {};

class RegistryActor {
 public:
  using Message = std::variant<RegisterWorker, WorkerHeartbeat, DeregisterWorker, GetClusterStatus,
                               SweepWorkers>;

  // `generation` (may be empty) receives the healthy prefill and decode workers after every
  // change; `requests_in_flight` (may be null) is the front door's gauge for ClusterStatus.
  RegistryActor(WorkerRegistry registry, absl::Duration sweep_interval,
                runtime::ActorRef<ExpertRouter::Message> expert_router,
                runtime::ActorRef<GenerationActor::Message> generation = {},
                std::shared_ptr<std::atomic<int32_t>> requests_in_flight = nullptr)
      : registry_(std::move(registry)),
        sweep_interval_(sweep_interval),
        expert_router_(std::move(expert_router)),
        generation_(std::move(generation)),
        requests_in_flight_(std::move(requests_in_flight)) {}

  void Handle(RegisterWorker m);
  void Handle(WorkerHeartbeat m);
  void Handle(DeregisterWorker m);
  void Handle(GetClusterStatus m);
  void Handle(SweepWorkers m, runtime::Context<Message>& ctx);

 private:
  void PublishPlacement();
  void PublishServing();

  WorkerRegistry registry_;
  absl::Duration sweep_interval_;
  runtime::ActorRef<ExpertRouter::Message> expert_router_;
  runtime::ActorRef<GenerationActor::Message> generation_;
  std::shared_ptr<std::atomic<int32_t>> requests_in_flight_;
  std::map<std::string, std::shared_ptr<ExpertClient>> clients_;  // by worker id
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_REGISTRY_ACTOR_H_
