#include "router/registry_actor.h"

#include <iostream>

#include "common/base/log.h"
#include "absl/strings/str_cat.h"

namespace splitmoe::router {

void RegistryActor::Handle(RegisterWorker m) {
  absl::StatusOr<v1::RegisterResponse> r = registry_.Register(m.request, absl::Now());
  if (r.ok() && m.request.role() == v1::WORKER_ROLE_EXPERT) PublishTable(absl::Now());
  if (r.ok() && m.request.role() != v1::WORKER_ROLE_EXPERT) PublishServing();
  m.reply(std::move(r));
}

void RegistryActor::Handle(WorkerHeartbeat m) {
  m.reply(registry_.Heartbeat(m.request, absl::Now()));
  // An expert replica that finished loading a placement may complete the switch to it.
  if (registry_.TakePlacementProgress()) PublishTable(absl::Now());
}

void RegistryActor::Handle(RebalanceExperts m) {
  absl::StatusOr<v1::RebalanceResponse> r = registry_.Rebalance(m.request);
  if (r.ok() && !m.request.dry_run()) {
    (void)registry_.TakePlacementProgress();
    PublishTable(absl::Now());
  }
  m.reply(std::move(r));
}

void RegistryActor::Handle(DeregisterWorker m) {
  registry_.Deregister(m.worker_id);
  PublishTable(absl::Now());
  PublishServing();
  m.reply(absl::OkStatus());
}

void RegistryActor::Handle(AttachWorker m) {
  if (!registry_.Knows(m.worker_id)) {
    m.finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("worker ", m.worker_id, " is not registered")));
  }
}

void RegistryActor::Handle(WorkerConnectionLost m) {
  if (!registry_.ConnectionLost(m.worker_id)) return;
  SPLITMOE_LOG(WARNING, "router").With("worker", m.worker_id)
      << "worker lost its connection: out of service";
  PublishTable(absl::Now());
  PublishServing();
}

void RegistryActor::Handle(GetClusterStatus m) {
  v1::ClusterStatusResponse status = registry_.Status(absl::Now());
  if (gauges_ != nullptr) {
    status.set_requests_in_flight(gauges_->requests_in_flight.load());
    status.set_request_failovers(gauges_->request_failovers.load());
    status.set_request_preemptions(gauges_->request_preemptions.load());
    auto [metrics_url, http_url] = gauges_->Urls();
    status.set_metrics_url(metrics_url);
    status.set_http_url(http_url);
  }
  if (readiness_ != nullptr) {
    status.set_ready(readiness_->ready());
    status.set_not_ready_reason(readiness_->reason());
  }
  m.reply(std::move(status));
}

void RegistryActor::Handle(SweepWorkers, runtime::Context<Message>& ctx) {
  const absl::Time now = absl::Now();
  std::vector<std::string> lost = registry_.Sweep(now);
  for (const std::string& id : lost) {
    SPLITMOE_LOG(WARNING, "router").With("worker", id)
        << "worker stopped heartbeating: out of service";
  }
  registry_.CloseBalancingWindow();
  PublishTable(now);
  if (routing_snapshot_ != nullptr) routing_snapshot_->Set(registry_.Status(now).routing());
  if (!lost.empty()) PublishServing();
  ctx.ScheduleAfter(sweep_interval_, SweepWorkers{});
}

void RegistryActor::Handle(AddTableWatcher m) {
  if (settled_ && registry_.table().version() > 0 && !m.write(registry_.table())) return;
  watchers_.push_back(std::move(m.write));
}

void RegistryActor::PublishTable(absl::Time now) {
  const bool changed = registry_.RefreshTable();
  UpdateReadiness();
  if (!settled_) {
    settled_ = registry_.TableComplete() || now >= settle_until_;
    if (!settled_) return;
  } else if (!changed) {
    return;
  }
  const v1::RoutingTable& table = registry_.table();
  for (auto it = watchers_.begin(); it != watchers_.end();) {
    it = (*it)(table) ? it + 1 : watchers_.erase(it);
  }
}

void RegistryActor::PublishServing() {
  UseServingWorkers serving;
  for (v1::WorkerRole role : {v1::WORKER_ROLE_PREFILL, v1::WORKER_ROLE_DECODE}) {
    for (const v1::WorkerStatus* w : registry_.Healthy(role)) {
      serving.workers.push_back({w->worker_id(), w->address(), role});
    }
  }
  generation_.Send(std::move(serving));
  UpdateReadiness();
}

void RegistryActor::UpdateReadiness() {
  if (readiness_ != nullptr) readiness_->Set(registry_.NotReadyReason());
}

}  // namespace splitmoe::router
