// Readiness: whether the cluster behind this router can serve a request now, written by the
// registry actor after every membership or table change and read by the health services (gRPC's
// grpc.health.v1, the HTTP front door's GET /health) and the metrics. Serving needs a healthy
// prefill and decode worker and a live replica of every expert shard.
//
// The gRPC health service answers, per service name: "" (the whole server) and
// "splitmoe.v1.Generation" NOT_SERVING until ready; the other services (ClusterInfo, the
// internal Registry) stay SERVING while the process lives, so a liveness probe names one of
// them and a readiness probe names "". Thread-safe.
#ifndef SPLITMOE_ROUTER_READINESS_H_
#define SPLITMOE_ROUTER_READINESS_H_

#include <grpcpp/health_check_service_interface.h>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace splitmoe::router {

class Readiness {
 public:
  // The services whose health follows readiness (besides "").
  static constexpr const char* kGatedService = "splitmoe.v1.Generation";

  // `reason` empty: ready; else why not.
  void Set(std::string reason) {
    std::lock_guard<std::mutex> lock(mu_);
    const bool was = known_ && reason_.empty();
    reason_ = std::move(reason);
    const bool ready = reason_.empty();
    if (known_ && was == ready) return;
    known_ = true;
    ApplyLocked();
  }

  // Starts driving `health` (which must outlive this or be detached with nullptr);
  // `always_serving` are the server's other services, SERVING while the process lives.
  void AttachHealth(grpc::HealthCheckServiceInterface* health,
                    const std::vector<std::string>& always_serving) {
    std::lock_guard<std::mutex> lock(mu_);
    health_ = health;
    if (health_ != nullptr) {
      for (const std::string& service : always_serving) health_->SetServingStatus(service, true);
    }
    ApplyLocked();
  }

  bool ready() const {
    std::lock_guard<std::mutex> lock(mu_);
    return known_ && reason_.empty();
  }
  // Why the cluster is not ready ("" when it is).
  std::string reason() const {
    std::lock_guard<std::mutex> lock(mu_);
    return known_ ? reason_ : std::string("the router has not seen the cluster yet");
  }

 private:
  void ApplyLocked() {
    if (health_ == nullptr) return;
    const bool ready = known_ && reason_.empty();
    health_->SetServingStatus("", ready);
    health_->SetServingStatus(kGatedService, ready);
  }

  mutable std::mutex mu_;
  bool known_ = false;
  std::string reason_;
  grpc::HealthCheckServiceInterface* health_ = nullptr;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_READINESS_H_
