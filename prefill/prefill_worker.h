// The prefill worker's actor and its gRPC face.
//
// PrefillActor owns the attention side of the model (a Transformer whose routed experts are
// computed through the router) and the UCX transport to decode workers. Messages:
//   RunPrompt (Prefill.RunPrefill): queued; a RunBatch follows.
//   RunBatch (self): the queued prompts, up to a token budget, prefilled together
//   (engine::PrefillBatch: one forward pass per round over the next chunk of every prompt, so
//   projections and MoE dispatches are shared). After every layer, each prompt's new latents are
//   put into its decode worker's reserved blocks (LatentShipper) while the next layer computes;
//   then, per prompt, flush and Decode.Start with the first sampled token — data, flush,
//   notification, in that order. A prompt that is cancelled (the router cancels the call) or
//   passes its transfer deadline stops putting, flushes, and tells the decode worker
//   Release(writer_done) so its blocks can be reused at once; the others go on.
// Prompts that arrive while a batch computes wait in the mailbox and form the next batch. The
// calls to decode workers are synchronous with short deadlines: part of this actor's work.
#ifndef SPLITMOE_PREFILL_PREFILL_WORKER_H_
#define SPLITMOE_PREFILL_PREFILL_WORKER_H_

#include <atomic>
#include <deque>
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

struct RunBatch {};

struct RunPrompt {
  v1::PrefillRequest request;
  // True once the caller has cancelled (polled between layers); may be null.
  std::function<bool()> cancelled;
  absl::Time received;
  runtime::Reply<v1::PrefillResponse> reply;
};

class PrefillActor {
 public:
  using Message = std::variant<RunPrompt, RunBatch>;

  // `batch_tokens`: prompt tokens prefilled together at most (a longer prompt runs alone).
  PrefillActor(engine::Transformer* transformer, transfer::UcxTransport* transport,
               std::shared_ptr<decode::LoadGauge> gauge, engine::AttentionForm form,
               int64_t batch_tokens = 2048)
      : transformer_(transformer),
        transport_(transport),
        gauge_(std::move(gauge)),
        form_(form),
        batch_tokens_(batch_tokens) {}

  void Handle(RunPrompt m, runtime::Context<Message>& ctx);
  void Handle(RunBatch m, runtime::Context<Message>& ctx);

  uint64_t batches() const { return batches_; }

 private:
  struct Job;
  // Checks the request and connects its shipper; the job's status says why not.
  absl::Status Prepare(Job& job);
  // Prefills every prepared job together, shipping latents layer by layer.
  void Compute(std::vector<std::unique_ptr<Job>>& jobs);
  // Flush, then Start (or release as writer); the reply.
  absl::StatusOr<v1::PrefillResponse> Conclude(Job& job, uint64_t* bytes_put);
  v1::Decode::Stub* DecodeStub(const std::string& address);
  // Tells the decode worker the writer is done with a reservation it will not start.
  void ReleaseAsWriter(const v1::LatentDestination& d, const std::string& request_id,
                       const std::string& reason);
  void PublishLoad();

  engine::Transformer* transformer_;
  transfer::UcxTransport* transport_;
  std::shared_ptr<decode::LoadGauge> gauge_;
  engine::AttentionForm form_;
  int64_t batch_tokens_;
  std::deque<RunPrompt> pending_;
  bool batch_scheduled_ = false;
  std::map<std::string, std::unique_ptr<v1::Decode::Stub>> decode_stubs_;
  uint64_t latent_bytes_sent_ = 0, latent_tokens_ = 0, prompts_ = 0, batches_ = 0;
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
