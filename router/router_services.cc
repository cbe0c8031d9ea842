#include "router/router_services.h"

#include "absl/time/clock.h"
#include "common/rpc/bidi_stream.h"
#include "common/rpc/rpc.h"

namespace splitmoe::router {
namespace {

grpc::Status Stopping() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, "router is stopping");
}

}  // namespace

grpc::ServerUnaryReactor* RegistryService::Register(grpc::CallbackServerContext* ctx,
                                                    const v1::RegisterRequest* request,
                                                    v1::RegisterResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!post_([this, reactor, request, response](WorkerRegistry& registry) {
        absl::StatusOr<v1::RegisterResponse> r = registry.Register(*request, absl::Now());
        if (r.ok()) {
          *response = *r;
          if (on_change_) on_change_(registry);
        }
        reactor->Finish(rpc::ToGrpcStatus(r.status()));
      })) {
    reactor->Finish(Stopping());
  }
  return reactor;
}

grpc::ServerUnaryReactor* RegistryService::Heartbeat(grpc::CallbackServerContext* ctx,
                                                     const v1::HeartbeatRequest* request,
                                                     v1::HeartbeatResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!post_([reactor, request, response](WorkerRegistry& registry) {
        *response = registry.Heartbeat(*request, absl::Now());
        reactor->Finish(grpc::Status::OK);
      })) {
    reactor->Finish(Stopping());
  }
  return reactor;
}

grpc::ServerUnaryReactor* RegistryService::Deregister(grpc::CallbackServerContext* ctx,
                                                      const v1::DeregisterRequest* request,
                                                      v1::DeregisterResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!post_([this, reactor, request](WorkerRegistry& registry) {
        registry.Deregister(request->worker_id());
        if (on_change_) on_change_(registry);
        reactor->Finish(grpc::Status::OK);
      })) {
    reactor->Finish(Stopping());
  }
  return reactor;
}

grpc::ServerUnaryReactor* RegistryService::ClusterStatus(
    grpc::CallbackServerContext* ctx, const v1::ClusterStatusRequest* /*request*/,
    v1::ClusterStatusResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!post_([reactor, response](WorkerRegistry& registry) {
        *response = registry.Status(absl::Now());
        reactor->Finish(grpc::Status::OK);
      })) {
    reactor->Finish(Stopping());
  }
  return reactor;
}

grpc::ServerBidiReactor<v1::MoeBatch, v1::MoeResult>* MoeDispatchService::Dispatch(
    grpc::CallbackServerContext* /*ctx*/) {
  using Stream = rpc::BidiStream<v1::MoeBatch, v1::MoeResult>;
  return new Stream([this](v1::MoeBatch batch, Stream::Reply reply) {
    auto shared = std::make_shared<v1::MoeBatch>(std::move(batch));
    if (!post_(
            [shared, reply](ExpertRouter& router) { router.OnBatch(std::move(*shared), reply); })) {
      v1::MoeResult r;
      r.set_batch_id(shared->batch_id());
      r.set_error("router is stopping");
      reply(std::move(r));
    }
  });
}

}  // namespace splitmoe::router
