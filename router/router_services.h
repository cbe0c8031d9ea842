// The router's internal gRPC services. Handlers translate and post to the owning actor; replies
// finish the RPC from whichever thread the actor answers on.
//   RegistryService     -> registry actor (WorkerRegistry): register, heartbeat, status
//   MoeDispatchService  -> expert-router actor (ExpertRouter): one stream per attention worker
#ifndef SPLITMOE_ROUTER_ROUTER_SERVICES_H_
#define SPLITMOE_ROUTER_ROUTER_SERVICES_H_

#include <functional>

#include "absl/status/statusor.h"
#include "router/expert_router.h"
#include "router/registry.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::router {

// Runs `task(registry)` on the registry actor; false if it has stopped.
using RegistryPost = std::function<bool(std::function<void(WorkerRegistry&)>)>;
// Runs `task(router)` on the expert-router actor; false if it has stopped.
using ExpertRouterPost = std::function<bool(std::function<void(ExpertRouter&)>)>;

class RegistryService final : public v1::Registry::CallbackService {
 public:
  // `on_change` runs on the registry actor after every membership change (to update placement).
  RegistryService(RegistryPost post, std::function<void(WorkerRegistry&)> on_change)
      : post_(std::move(post)), on_change_(std::move(on_change)) {}

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* ctx,
                                     const v1::RegisterRequest* request,
                                     v1::RegisterResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* Deregister(grpc::CallbackServerContext* ctx,
                                       const v1::DeregisterRequest* request,
                                       v1::DeregisterResponse* response) override;
  grpc::ServerUnaryReactor* ClusterStatus(grpc::CallbackServerContext* ctx,
                                          const v1::ClusterStatusRequest* request,
                                          v1::ClusterStatusResponse* response) override;

 private:
  RegistryPost post_;
  std::function<void(WorkerRegistry&)> on_change_;
};

class MoeDispatchService final : public v1::MoeDispatch::CallbackService {
 public:
  explicit MoeDispatchService(ExpertRouterPost post) : post_(std::move(post)) {}
  grpc::ServerBidiReactor<v1::MoeBatch, v1::MoeResult>* Dispatch(
      grpc::CallbackServerContext* ctx) override;

 private:
  ExpertRouterPost post_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_ROUTER_SERVICES_H_
