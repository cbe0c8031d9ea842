// The prefill worker's actor and its gRPC face.
//
// PrefillActor owns the attention side of the model (a Transformer whose routed experts are
// computed through the router) and the UCX transport to decode workers. One message:
//   RunPrompt (Prefill.RunPrefill): run the prompt in chunks; after every layer of every chunk
//   put that layer's new latents into the decode worker's reserved blocks (LatentShipper) while
//   the next layer computes; flush; then Decode.Start with the first sampled token — data, flush,
//   notification, in that order. If the prompt fails, is cancelled (the router cancels the call)
//   or passes its transfer deadline, the actor stops putting, flushes, and tells the decode
//   worker Release(writer_done) so the blocks can be reused at once.
// Prompts run one at a time (the handler computes; the mailbox queues the rest). The calls to
// the decode worker are synchronous with short deadlines: they are part of this actor's work.
#ifndef SPLITMOE_PREFILL_PREFILL_WORKER_H_
#define SPLITMOE_PREFILL_PREFILL_WORKER_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "common/engine/transformer.h"
#include "common/runtime/actor.h"
#include "common/runtime/reply.h"
#include "common/transfer/ucx_transport.h"
#include "decode/decode_worker.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::prefill {

struct RunPrompt {
  v1::PrefillRequest request;
  // True once the caller has cancelled (polled between layers); may be null.
  std::function<bool()> cancelled;
  absl::Time received;
  runtime::Reply<v1::PrefillResponse> reply;
};

class PrefillActor {
 public:
  using Message = std::variant<RunPrompt>;

  PrefillActor(engine::Transformer* transformer, transfer::UcxTransport* transport,
               std::shared_ptr<decode::LoadGauge> gauge, engine::AttentionForm form)
      : transformer_(transformer), transport_(transport), gauge_(std::move(gauge)), form_(form) {}

  void Handle(RunPrompt m);

 private:
  absl::StatusOr<v1::PrefillResponse> Run(const RunPrompt& m, uint64_t* bytes_put);
  v1::Decode::Stub* DecodeStub(const std::string& address);
  // Tells the decode worker the writer is done with a reservation it will not start.
  void ReleaseAsWriter(const v1::LatentDestination& d, const std::string& request_id,
                       const std::string& reason);
  void PublishLoad();

  engine::Transformer* transformer_;
  transfer::UcxTransport* transport_;
  std::shared_ptr<decode::LoadGauge> gauge_;
  engine::AttentionForm form_;
  std::map<std::string, std::unique_ptr<v1::Decode::Stub>> decode_stubs_;
  uint64_t latent_bytes_sent_ = 0, latent_tokens_ = 0, prompts_ = 0;
};

class PrefillService final : public v1::Prefill::CallbackService {
 public:
  explicit PrefillService(runtime::ActorRef<PrefillActor::Message> actor)
      : actor_(std::move(actor)) {}
  grpc::ServerUnaryReactor* RunPrefill(grpc::CallbackServerContext* ctx,
                                       const v1::PrefillRequest* request,
                                       v1::PrefillResponse* response) override;
  int32_t in_flight() const { return in_flight_.load(); }

 private:
  runtime::ActorRef<PrefillActor::Message> actor_;
  std::atomic<int32_t> in_flight_{0};
};

}  // namespace splitmoe::prefill

#endif  // SPLITMOE_PREFILL_PREFILL_WORKER_H_
