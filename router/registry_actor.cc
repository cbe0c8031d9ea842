#include "router/registry_actor.h"

#include <iostream>

namespace splitmoe::router {

void RegistryActor::Handle(RegisterWorker m) {
  absl::StatusOr<v1::RegisterResponse> r = registry_.Register(m.request, absl::Now());
  if (r.ok() && m.request.role() == v1::WORKER_ROLE_EXPERT) PublishPlacement();
  if (r.ok() && m.request.role() != v1::WORKER_ROLE_EXPERT) PublishServing();
  m.reply(std::move(r));
}

void RegistryActor::Handle(WorkerHeartbeat m) {
  m.reply(registry_.Heartbeat(m.request, absl::Now()));
}

void RegistryActor::Handle(DeregisterWorker m) {
  registry_.Deregister(m.worker_id);
  PublishPlacement();
  PublishServing();
  m.reply(absl::OkStatus());
}

void RegistryActor::Handle(GetClusterStatus m) {
  v1::ClusterStatusResponse status = registry_.Status(absl::Now());
  if (requests_in_flight_ != nullptr) status.set_requests_in_flight(requests_in_flight_->load());
  m.reply(std::move(status));
}

void RegistryActor::Handle(SweepWorkers, runtime::Context<Message>& ctx) {
  std::vector<std::string> lost = registry_.Sweep(absl::Now());
  for (const std::string& id : lost) {
    std::cerr << "router: worker " << id << " stopped heartbeating: out of service\n";
  }
  if (!lost.empty()) {
    PublishPlacement();
    PublishServing();
  }
  ctx.ScheduleAfter(sweep_interval_, SweepWorkers{});
}

void RegistryActor::PublishPlacement() {
  ServicePlacement placement = registry_.Placement();
  std::map<std::string, std::shared_ptr<ExpertClient>> next;
  for (size_t i = 0; i < placement.services.size(); ++i) {
    auto existing = clients_.find(placement.services[i]);
    if (existing != clients_.end() && !existing->second->broken()) {
      next[placement.services[i]] = existing->second;
      continue;
    }
    absl::StatusOr<std::unique_ptr<ExpertClient>> client =
        ExpertClient::Connect(placement.addresses[i]);
    if (!client.ok()) {
      std::cerr << "router: " << client.status() << "\n";
      continue;
    }
    next[placement.services[i]] = std::move(*client);
  }
  clients_ = next;
  expert_router_.Send(UsePlacement{std::move(placement), std::move(next)});
}

}  // namespace splitmoe::router

namespace splitmoe::router {

void RegistryActor::PublishServing() {
  UseServingWorkers serving;
  for (v1::WorkerRole role : {v1::WORKER_ROLE_PREFILL, v1::WORKER_ROLE_DECODE}) {
    for (const v1::WorkerStatus* w : registry_.Healthy(role)) {
      serving.workers.push_back({w->worker_id(), w->address(), role});
    }
  }
  generation_.Send(std::move(serving));
}

}  // namespace splitmoe::router
