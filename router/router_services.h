// The router's internal gRPC services. Handlers translate and post to the owning actor; replies
// finish the RPC from whichever thread the actor answers on.
//   RegistryService     -> registry actor (WorkerRegistry): register, heartbeat, status, and the
//                          routing-table watch streams of the attention workers
#ifndef SPLITMOE_ROUTER_ROUTER_SERVICES_H_
#define SPLITMOE_ROUTER_ROUTER_SERVICES_H_

#include "common/runtime/actor.h"
#include "router/registry_actor.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::router {

class RegistryService final : public v1::Registry::CallbackService {
 public:
  explicit RegistryService(runtime::ActorRef<RegistryActor::Message> registry)
      : registry_(std::move(registry)) {}

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
  grpc::ServerWriteReactor<v1::RoutingTable>* WatchRoutingTable(
      grpc::CallbackServerContext* ctx, const v1::WatchRoutingTableRequest* request) override;
  grpc::ServerWriteReactor<v1::AttachEvent>* Attach(grpc::CallbackServerContext* ctx,
                                                    const v1::AttachRequest* request) override;
  grpc::ServerUnaryReactor* Rebalance(grpc::CallbackServerContext* ctx,
                                      const v1::RebalanceRequest* request,
                                      v1::RebalanceResponse* response) override;

 private:
  runtime::ActorRef<RegistryActor::Message> registry_;
};


// The public ClusterInfo service: ClusterStatus answered by the registry actor.
class ClusterInfoService final : public v1::ClusterInfo::CallbackService {
 public:
  explicit ClusterInfoService(runtime::ActorRef<RegistryActor::Message> registry)
      : registry_(std::move(registry)) {}
  grpc::ServerUnaryReactor* ClusterStatus(grpc::CallbackServerContext* ctx,
                                          const v1::ClusterStatusRequest* request,
                                          v1::ClusterStatusResponse* response) override;

 private:
  runtime::ActorRef<RegistryActor::Message> registry_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_ROUTER_SERVICES_H_
