// The prefill worker's actor and its gRPC face.
//
// PrefillActor owns the attention side of the model (a Transformer whose routed experts are
// computed through the router) and the UCX transport to decode workers. Messages:
//   RunPrompt (Prefill.RunPrefill): queued; a RunBatch follows.
//   RunBatch (self): the queued prompts, up to a token budget, go to the executor as one batch
//   (one batch at a time), prefilled together (engine::PrefillBatch: one forward pass per round
//   over the next chunk of every prompt, so projections and MoE dispatches are shared; with
//   `micro_batches` 2 and two or more prompts, two groups in ping-pong, one's attention while the
//   other's experts compute; with one prompt of several chunks, its chunks as a wavefront, one
//   chunk's attention while the chunk before waits for its experts). After every layer, each prompt's new latents are
//   put into its decode worker's reserved blocks (LatentShipper) while the next layer computes;
//   then, per prompt, flush and Decode.Start with the first sampled token — data, flush,
//   notification, in that order. A prompt that is cancelled (the router cancels the call) or
//   passes its transfer deadline stops putting, flushes, and tells the decode worker
//   Release(writer_done) so its blocks can be reused at once; the others go on.
//   BatchDone (executor): the batch's answers, replied to; the next batch starts.
// The batch (forward passes, latent puts, the calls to decode workers, which have short
// deadlines) runs on the executor, never in a handler; prompts that arrive meanwhile are queued
// and form the next batch.
#ifndef SPLITMOE_PREFILL_PREFILL_WORKER_H_
#define SPLITMOE_PREFILL_PREFILL_WORKER_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/engine/overlap.h"
#include "common/engine/transformer.h"
#include "common/runtime/actor.h"
#include "common/runtime/executor.h"
#include "common/runtime/reply.h"
#include "common/transfer/ucx_transport.h"
#include "decode/decode_worker.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::prefill {

struct RunBatch {};
// The batch's outcome, per prompt in batch order, and what it moved.
struct BatchDone {
  std::vector<absl::StatusOr<v1::PrefillResponse>> results;
  uint64_t latent_bytes = 0, latent_tokens = 0;
};

struct RunPrompt {
  v1::PrefillRequest request;
  // True once the caller has cancelled (polled between layers); may be null.
  std::function<bool()> cancelled;
  absl::Time received;
  runtime::Reply<v1::PrefillResponse> reply;
  // Set by a CancelPrompt for this prompt (the actor fills it in when the prompt arrives).
  std::shared_ptr<std::atomic<bool>> cancel_requested;
};

// Prefill.CancelPrefill: the prompt named by request id and destination stops if queued or
// running here; if this worker has not seen it, it is refused should it still arrive
// (remembered for kCancelledPromptMemory) and its reservation is released as the writer now.
struct CancelPrompt {
  v1::CancelPrefillRequest request;
  runtime::Reply<v1::CancelPrefillResponse> reply;
};

class PrefillActor {
 public:
  using Message = std::variant<RunPrompt, RunBatch, BatchDone, CancelPrompt>;
  // How long a prompt cancelled before it arrived is remembered (and refused), and how many.
  static constexpr absl::Duration kCancelledPromptMemory = absl::Minutes(10);
  static constexpr size_t kMaxCancelledPrompts = 16384;

  // A prompt's local latent cache (every main layer, or the MTP module's one), where the
  // transformer computes: on a GPU, a sequence's share of the device's pool.
  using CacheFactory =
      std::function<absl::StatusOr<std::unique_ptr<engine::SequenceCache>>(bool mtp)>;

  // `batch_tokens`: prompt tokens prefilled together at most (a longer prompt runs alone).
  // `executor` runs the batches (a ThreadExecutor in the process; Inline or Manual in tests).
  // `transport` may be null when no prompt names a destination (tests). `new_cache` (called on
  // the executor; caches are dropped on the actor): null, host LatentCaches.
  PrefillActor(engine::Transformer* transformer, transfer::UcxTransport* transport,
               std::shared_ptr<decode::LoadGauge> gauge, engine::AttentionForm form,
               int64_t batch_tokens, int micro_batches,
               std::unique_ptr<runtime::Executor> executor, CacheFactory new_cache = nullptr);
  ~PrefillActor();  // where Job is complete

  void Handle(RunPrompt m, runtime::Context<Message>& ctx);
  void Handle(RunBatch m, runtime::Context<Message>& ctx);
  void Handle(BatchDone m, runtime::Context<Message>& ctx);
  void Handle(CancelPrompt m, runtime::Context<Message>& ctx);

  uint64_t batches() const { return batches_; }

 private:
  struct Job;
  // Checks the request and connects its shipper; the job's status says why not.
  absl::Status Prepare(Job& job);
  // The destination's cached prefix (LatentDestination.cached_tokens rows, every layer) read
  // back from the decode worker into the job's local caches, which then start at that length.
  absl::Status ReadCachedPrefix(Job& job, const decode::PagedLatentLayout& layout,
                                transfer::PeerId peer, const transfer::RegionDescriptor& remote);
  // The executor's part: prepare, prefill, conclude every job of `batch_`.
  BatchDone RunJobs();
  // Prefills every prepared job together, shipping latents layer by layer.
  void Compute(std::vector<std::unique_ptr<Job>>& jobs);
  // Flush, then Start (or release as writer); the reply.
  absl::StatusOr<v1::PrefillResponse> Conclude(Job& job, uint64_t* bytes_put);
  v1::Decode::Stub* DecodeStub(const std::string& address);
  // Tells the decode worker the writer is done with a reservation it will not start.
  void ReleaseAsWriter(const v1::LatentDestination& d, const std::string& request_id,
                       const std::string& reason);
  void PublishLoad();
  absl::StatusOr<std::unique_ptr<engine::SequenceCache>> NewCache(bool mtp);

  engine::Transformer* transformer_;
  CacheFactory new_cache_;
  transfer::UcxTransport* transport_;
  std::shared_ptr<decode::LoadGauge> gauge_;
  engine::AttentionForm form_;
  int64_t batch_tokens_;
  std::unique_ptr<engine::PingPong> overlap_;  // with micro_batches 2
  std::deque<RunPrompt> pending_;
  bool batch_scheduled_ = false;
  // The batch on the executor; the actor does not touch it (nor the stubs) until BatchDone.
  std::vector<std::unique_ptr<Job>> batch_;
  bool computing_ = false;
  std::map<std::string, std::unique_ptr<v1::Decode::Stub>> decode_stubs_;  // the executor's
  uint64_t latent_bytes_sent_ = 0, latent_tokens_ = 0, prompts_ = 0, batches_ = 0;
  // Prompts queued or in the batch, by PromptKey: their cancel flags.
  std::map<std::string, std::shared_ptr<std::atomic<bool>>> live_;
  // Prompts cancelled before they arrived, by PromptKey, oldest first.
  std::map<std::string, absl::Time> cancelled_unseen_;
  std::deque<std::pair<absl::Time, std::string>> cancelled_order_;
  // Last: destroyed first, so a batch still running finishes while what it uses exists.
  std::unique_ptr<runtime::Executor> executor_;
};

class PrefillService final : public v1::Prefill::CallbackService {
 public:
  explicit PrefillService(runtime::ActorRef<PrefillActor::Message> actor)
      : actor_(std::move(actor)) {}
  grpc::ServerUnaryReactor* RunPrefill(grpc::CallbackServerContext* ctx,
                                       const v1::PrefillRequest* request,
                                       v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* CancelPrefill(grpc::CallbackServerContext* ctx,
                                          const v1::CancelPrefillRequest* request,
                                          v1::CancelPrefillResponse* response) override;
  int32_t in_flight() const { return in_flight_.load(); }

 private:
  runtime::ActorRef<PrefillActor::Message> actor_;
  std::atomic<int32_t> in_flight_{0};
};

}  // namespace splitmoe::prefill

#endif  // SPLITMOE_PREFILL_PREFILL_WORKER_H_
