#include "router/router_services.h"

#include "common/rpc/security.h"
#include "common/rpc/server_stream.h"
#include "common/rpc/rpc.h"

namespace splitmoe::router {
namespace {

// Registry.ClusterStatus and ClusterInfo.ClusterStatus: the registry actor answers.
grpc::ServerUnaryReactor* AnswerClusterStatus(runtime::ActorRef<RegistryActor::Message>& registry,
                                              grpc::CallbackServerContext* ctx,
                                              v1::ClusterStatusResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  registry.Send(GetClusterStatus{[reactor, response](absl::StatusOr<v1::ClusterStatusResponse> r) {
    if (r.ok()) *response = std::move(*r);
    reactor->Finish(rpc::ToGrpcStatus(r.status()));
  }});
  return reactor;
}

}  // namespace

// Each handler sends a message carrying a reply that finishes the RPC; a stopped actor answers
// that reply itself (Unavailable), so every call finishes exactly once.

grpc::ServerUnaryReactor* RegistryService::Register(grpc::CallbackServerContext* ctx,
                                                    const v1::RegisterRequest* request,
                                                    v1::RegisterResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  registry_.Send(
      RegisterWorker{*request, [reactor, response](absl::StatusOr<v1::RegisterResponse> r) {
                       if (r.ok()) *response = std::move(*r);
                       reactor->Finish(rpc::ToGrpcStatus(r.status()));
                     }});
  return reactor;
}

grpc::ServerUnaryReactor* RegistryService::Heartbeat(grpc::CallbackServerContext* ctx,
                                                     const v1::HeartbeatRequest* request,
                                                     v1::HeartbeatResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  registry_.Send(
      WorkerHeartbeat{*request, [reactor, response](absl::StatusOr<v1::HeartbeatResponse> r) {
                        if (r.ok()) *response = std::move(*r);
                        reactor->Finish(rpc::ToGrpcStatus(r.status()));
                      }});
  return reactor;
}

grpc::ServerUnaryReactor* RegistryService::Deregister(grpc::CallbackServerContext* ctx,
                                                      const v1::DeregisterRequest* request,
                                                      v1::DeregisterResponse* /*response*/) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  registry_.Send(DeregisterWorker{
      request->worker_id(), [reactor](absl::Status s) { reactor->Finish(rpc::ToGrpcStatus(s)); }});
  return reactor;
}

grpc::ServerUnaryReactor* RegistryService::ClusterStatus(
    grpc::CallbackServerContext* ctx, const v1::ClusterStatusRequest* /*request*/,
    v1::ClusterStatusResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  return AnswerClusterStatus(registry_, ctx, response);
}

grpc::ServerUnaryReactor* RegistryService::Rebalance(grpc::CallbackServerContext* ctx,
                                                     const v1::RebalanceRequest* request,
                                                     v1::RebalanceResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  registry_.Send(
      RebalanceExperts{*request, [reactor, response](absl::StatusOr<v1::RebalanceResponse> r) {
                         if (r.ok()) *response = std::move(*r);
                         reactor->Finish(rpc::ToGrpcStatus(r.status()));
                       }});
  return reactor;
}

grpc::ServerWriteReactor<v1::RoutingTable>* RegistryService::WatchRoutingTable(
    grpc::CallbackServerContext* ctx, const v1::WatchRoutingTableRequest* /*request*/) {
  if (grpc::Status s = rpc::CheckInternalCaller(ctx); !s.ok()) {
    return rpc::RefusedWriter<v1::RoutingTable>(std::move(s));
  }
  auto [reactor, stream] = rpc::ServerStream<v1::RoutingTable>::Create(nullptr);
  auto write = [stream = stream](const v1::RoutingTable& t) { return stream->Write(t); };
  if (!registry_.Send(AddTableWatcher{write})) {
    stream->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "router is stopping"));
  }
  return reactor;
}

grpc::ServerWriteReactor<v1::AttachEvent>* RegistryService::Attach(
    grpc::CallbackServerContext* ctx, const v1::AttachRequest* request) {
  if (grpc::Status s = rpc::CheckInternalCaller(ctx); !s.ok()) {
    return rpc::RefusedWriter<v1::AttachEvent>(std::move(s));
  }
  const std::string id = request->worker_id();
  // The stream stays open, silent, for as long as the worker lives; its end is the news.
  auto [reactor, stream] = rpc::ServerStream<v1::AttachEvent>::Create(
      [registry = registry_, id] { registry.Send(WorkerConnectionLost{id}); });
  auto finish = [stream = stream](grpc::Status s) { stream->Finish(std::move(s)); };
  if (!registry_.Send(AttachWorker{id, finish})) {
    stream->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "router is stopping"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* ClusterInfoService::ClusterStatus(
    grpc::CallbackServerContext* ctx, const v1::ClusterStatusRequest* /*request*/,
    v1::ClusterStatusResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefusePublic(ctx)) return refused;
  return AnswerClusterStatus(registry_, ctx, response);
}

}  // namespace splitmoe::router
