#include "router/registry.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace splitmoe::router {

bool ServicePlacement::complete() const {
  return std::all_of(expert_to_service.begin(), expert_to_service.end(),
                     [](int32_t s) { return s >= 0; });
}

WorkerRegistry::WorkerRegistry(int64_t n_routed_experts, absl::Duration heartbeat_interval,
                               int missed_allowed, std::string model_fingerprint)
    : n_routed_experts_(n_routed_experts),
      heartbeat_interval_(heartbeat_interval),
      missed_allowed_(missed_allowed),
      model_fingerprint_(std::move(model_fingerprint)) {}

absl::StatusOr<v1::RegisterResponse> WorkerRegistry::Register(const v1::RegisterRequest& r,
                                                              absl::Time now) {
  if (r.role() == v1::WORKER_ROLE_UNSPECIFIED)
    return absl::InvalidArgumentError("worker role missing");
  if (r.address().empty()) return absl::InvalidArgumentError("worker address missing");
  if (!model_fingerprint_.empty() && r.model_fingerprint() != model_fingerprint_) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker at ", r.address(), " serves another model (", r.model_fingerprint(),
                     " != ", model_fingerprint_, ")"));
  }
  for (int32_t e : r.experts()) {
    if (e < 0 || e >= n_routed_experts_) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker at ", r.address(), " claims expert ", e));
    }
  }
  Worker w;
  w.status.set_worker_id(absl::StrCat(v1::WorkerRole_Name(r.role()).substr(12), "-", next_id_++));
  w.status.set_role(r.role());
  w.status.set_address(r.address());
  w.status.set_shard(r.shard());
  *w.status.mutable_experts() = r.experts();
  w.status.set_healthy(true);
  w.status.set_resident_weight_bytes(r.resident_weight_bytes());
  w.status.set_transfer_mode(r.transfer_mode());
  w.last_heartbeat = now;
  v1::RegisterResponse response;
  response.set_worker_id(w.status.worker_id());
  response.set_heartbeat_interval_ms(
      static_cast<int32_t>(absl::ToInt64Milliseconds(heartbeat_interval_)));
  response.set_missed_heartbeats_allowed(missed_allowed_);
  workers_.emplace(w.status.worker_id(), std::move(w));
  return response;
}

v1::HeartbeatResponse WorkerRegistry::Heartbeat(const v1::HeartbeatRequest& r, absl::Time now) {
  v1::HeartbeatResponse response;
  auto it = workers_.find(r.worker_id());
  if (it == workers_.end() || !it->second.status.healthy()) {
    response.set_known(false);  // taken out of service: it must register again
    if (it != workers_.end()) workers_.erase(it);
    return response;
  }
  it->second.last_heartbeat = now;
  *it->second.status.mutable_load() = r.load();
  response.set_known(true);
  return response;
}

void WorkerRegistry::Deregister(const std::string& worker_id) { workers_.erase(worker_id); }

std::vector<std::string> WorkerRegistry::Sweep(absl::Time now) {
  std::vector<std::string> lost;
  for (auto& [id, w] : workers_) {
    if (w.status.healthy() && now - w.last_heartbeat > heartbeat_interval_ * missed_allowed_) {
      w.status.set_healthy(false);
      lost.push_back(id);
    }
  }
  return lost;
}

ServicePlacement WorkerRegistry::Placement() const {
  ServicePlacement p;
  p.expert_to_service.assign(static_cast<size_t>(n_routed_experts_), -1);
  for (const auto& [id, w] : workers_) {
    if (w.status.role() != v1::WORKER_ROLE_EXPERT || !w.status.healthy()) continue;
    const int32_t index = static_cast<int32_t>(p.services.size());
    p.services.push_back(id);
    p.addresses.push_back(w.status.address());
    // The first healthy service registered for an expert serves it (replicas are standbys).
    for (int32_t e : w.status.experts()) {
      if (p.expert_to_service[e] < 0) p.expert_to_service[e] = index;
    }
  }
  return p;
}

std::vector<const v1::WorkerStatus*> WorkerRegistry::Healthy(v1::WorkerRole role) const {
  std::vector<const v1::WorkerStatus*> out;
  for (const auto& [id, w] : workers_) {
    if (w.status.role() == role && w.status.healthy()) out.push_back(&w.status);
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const v1::WorkerStatus* a, const v1::WorkerStatus* b) {
                     return a->load().requests_in_flight() < b->load().requests_in_flight();
                   });
  return out;
}

v1::ClusterStatusResponse WorkerRegistry::Status(absl::Time now) const {
  v1::ClusterStatusResponse response;
  for (const auto& [id, w] : workers_) {
    v1::WorkerStatus* s = response.add_workers();
    *s = w.status;
    s->set_last_heartbeat_age_ms(absl::ToDoubleMilliseconds(now - w.last_heartbeat));
    response.set_requests_in_flight(response.requests_in_flight() +
                                    w.status.load().requests_in_flight());
  }
  return response;
}

}  // namespace splitmoe::router
