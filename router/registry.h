// WorkerRegistry: the router's table of workers — who they are, what they host, when they last
// heartbeated — and the expert placement derived from it. Plain state with handlers: it is owned
// by the router's registry actor, which alone calls it (not thread-safe). Time is passed in, so
// tests drive it with a fake clock.
//
//   WorkerRegistry registry(/*n_routed_experts=*/256, absl::Milliseconds(500), /*missed=*/3);
//   SPLITMOE_ASSIGN_OR_RETURN(v1::RegisterResponse r, registry.Register(request, now));
//   registry.Sweep(now);                 // takes silent workers out of service
//   ExpertPlacement p = registry.Placement();
#ifndef SPLITMOE_ROUTER_REGISTRY_H_
#define SPLITMOE_ROUTER_REGISTRY_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::router {

// Which expert service serves each routed expert now: expert -> index into `services`, -1 when
// no healthy service hosts it.
struct ServicePlacement {
  std::vector<std::string> services;       // worker ids of the expert services in use
  std::vector<std::string> addresses;      // their gRPC addresses
  std::vector<int32_t> expert_to_service;  // [n_routed_experts]
  bool complete() const;
};

class WorkerRegistry {
 public:
  WorkerRegistry(int64_t n_routed_experts, absl::Duration heartbeat_interval, int missed_allowed,
                 std::string model_fingerprint);

  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& request, absl::Time now);
  v1::HeartbeatResponse Heartbeat(const v1::HeartbeatRequest& request, absl::Time now);
  void Deregister(const std::string& worker_id);
  // Marks workers silent for more than missed_allowed intervals unhealthy; returns their ids.
  std::vector<std::string> Sweep(absl::Time now);

  ServicePlacement Placement() const;
  // Healthy workers of a role, least loaded (requests in flight) first.
  std::vector<const v1::WorkerStatus*> Healthy(v1::WorkerRole role) const;
  v1::ClusterStatusResponse Status(absl::Time now) const;

 private:
  struct Worker {
    v1::WorkerStatus status;
    absl::Time last_heartbeat;
  };
  int64_t n_routed_experts_;
  absl::Duration heartbeat_interval_;
  int missed_allowed_;
  std::string model_fingerprint_;
  uint64_t next_id_ = 1;
  std::map<std::string, Worker> workers_;  // by worker id
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_REGISTRY_H_
