// The decode worker's actor and its gRPC face.
//
// DecodeActor owns the paged latent cache (its arena registered with UCX, so prefill workers put
// prompts' latents straight into it), the reservations, the continuous-batching decoder and the
// token streams to routers. Messages:
//   ReserveBlocks       (Decode.Reserve)   blocks for a prompt + max_tokens, all or nothing
//   ReleaseReservation  (Decode.Release)   a failed/cancelled request gives its blocks back
//   StartSequence       (Decode.Start)     the writer flushed: validate the fence, join the batch
//   CancelSequence      (Decode.Cancel)    by request id
//   AddTokenSink        (Decode.StreamTokens) a router's long-lived token stream
//   RunStep             (self)             hands one decode step of the batch to the executor
//   StepDone            (executor)         its tokens: streamed; finished sequences freed
//   ReclaimReservation  (timer)            a reservation whose writer never confirmed
//   WritersGone         (Decode.WritersGone) the router knows these writers are dead
// The step (the forward pass, with its MoE round trips) runs on the actor's executor, never in
// a handler: while it runs, the actor answers Reserve, Start, Release and Cancel at once. The
// batch belongs to the step until StepDone: a sequence started meanwhile waits in `joining_`
// and joins the next step; one released or cancelled meanwhile is stopped when the step is done
// (its token of that step is dropped, its blocks freed only then, so the step never writes into
// blocks another sequence was given). With `micro_batches` 2, a step of two or more sequences
// runs as two micro-batches in ping-pong (engine/overlap.h): one micro-batch's attention while
// the other's experts compute.
//
// Fencing (docs/architecture.md): a reservation is `reserved` until its writer's Start. A
// Release before that refuses any later Start at once, but the blocks are quarantined — kept off
// the free list — until the writer confirms that no put can land any more (Release with
// writer_done, or its Start being refused) or until the reservation's deadline plus a grace has
// passed (the writer issues no put after the deadline). So bytes of a cancelled transfer never
// land in blocks another sequence owns, and a late notification never starts a sequence on
// blocks that were reused (the generation check). Not thread-safe: the actor's thread only.
#ifndef SPLITMOE_DECODE_DECODE_WORKER_H_
#define SPLITMOE_DECODE_DECODE_WORKER_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "common/engine/batch_decoder.h"
#include "common/engine/overlap.h"
#include "common/rpc/server_stream.h"
#include "common/runtime/actor.h"
#include "common/runtime/executor.h"
#include "common/runtime/reply.h"
#include "decode/device_arena.h"
#include "decode/paged_latent_cache.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::decode {

struct ReserveBlocks {
  v1::ReserveRequest request;
  runtime::Reply<v1::ReserveResponse> reply;
};
struct ReleaseReservation {
  v1::ReleaseRequest request;
  runtime::Reply<void> reply;
};
// Decode.WritersGone: the router reports these writers dead; their quarantined blocks are freed.
struct WritersGone {
  v1::WritersGoneRequest request;
  runtime::Reply<v1::WritersGoneResponse> reply;
};
struct StartSequence {
  v1::StartRequest request;
  runtime::Reply<void> reply;
};
struct CancelSequence {
  std::string request_id;
  runtime::Reply<void> reply;
};
// A router's token stream: `write` queues one event and returns false once the stream is gone
// (it is then dropped). Called on the actor's thread; must not block.
// Events go only to the sinks of the router that owns the request (RequestOwner).
struct AddTokenSink {
  std::function<bool(const v1::TokenEvent&)> write;
  std::string router_id;
};
struct RunStep {};
struct StepDone {
  absl::StatusOr<std::vector<engine::DecodedToken>> tokens;
};
struct ReclaimReservation {
  uint64_t reservation_id = 0;
};

// The worker's load as the heartbeat reports it; written by the actor after every message, read
// by the heartbeat thread. Thread-safe.
class LoadGauge {
 public:
  void Set(v1::WorkerLoad load) {
    std::lock_guard<std::mutex> lock(mu_);
    load_ = std::move(load);
  }
  v1::WorkerLoad Get() const {
    std::lock_guard<std::mutex> lock(mu_);
    return load_;
  }

 private:
  mutable std::mutex mu_;
  v1::WorkerLoad load_;
};

struct DecodeActorOptions {
  // Where prefill workers write: copied into every reservation's LatentDestination.
  std::string ucx_worker_address;
  std::string rkey;
  uint64_t remote_base = 0;
  uint64_t region_bytes = 0;
  std::string transfer_mode;
  // Extra wait, past a reservation's deadline, before its unconfirmed blocks are reused.
  absl::Duration reclaim_grace = absl::Seconds(5);
  // Used when a Reserve names no timeout.
  absl::Duration default_reservation_timeout = absl::Seconds(30);
  // 2: a step of two or more sequences runs as two micro-batches in ping-pong; 1: one batch.
  int micro_batches = 1;
  // Speculative decoding (BatchDecoder): K draft tokens per verification pass, 0: off. The
  // cache's layout then has the MTP module's layer after the model's (num_hidden_layers + 1).
  int64_t draft_tokens = 0;
  // The cache grows: a reservation takes the prompt plus `reserve_margin_tokens` (0: one block),
  // a running sequence takes blocks as it decodes, and when none is free the sequence that
  // arrived last is preempted (its router re-prefills it). With `reserve_upfront` a reservation
  // takes prompt + max_tokens at once, as before (nothing is ever preempted).
  bool reserve_upfront = false;
  int64_t reserve_margin_tokens = 0;
  // Prefix cache (PagedLatentCache): a finished (or stopped) sequence's full blocks are kept,
  // and a reservation whose prompt starts with cached tokens shares them in place.
  bool prefix_cache = true;
  // A forward pass on a device (`decode --device cuda:N`): the cache's copy there, which the
  // sequences' views read and write (decode/device_arena.h); null: the pass runs on the CPU
  // over the host arena. Not owned; outlives the actor.
  DeviceArena* device_arena = nullptr;
};

// The router that owns a request: its internal id is "<router id>-<serial>" (empty: no '-').
std::string RequestOwner(const std::string& request_id);

// The longest a reservation may wait for its writer (ReserveRequest.timeout_ms is capped): a
// caller cannot hold blocks and the region's key for days.
inline constexpr int32_t kMaxReservationTimeoutMs = 10 * 60 * 1000;

class DecodeActor {
 public:
  using Message = std::variant<ReserveBlocks, ReleaseReservation, StartSequence, CancelSequence,
                               AddTokenSink, RunStep, StepDone, ReclaimReservation, WritersGone>;

  // `executor` runs the steps (a ThreadExecutor in the process; Inline or Manual in tests).
  DecodeActor(engine::Transformer* transformer, PagedLatentCache cache, DecodeActorOptions options,
              std::shared_ptr<LoadGauge> gauge, std::unique_ptr<runtime::Executor> executor);

  void Handle(ReserveBlocks m, runtime::Context<Message>& ctx);
  void Handle(ReleaseReservation m, runtime::Context<Message>& ctx);
  void Handle(StartSequence m, runtime::Context<Message>& ctx);
  void Handle(CancelSequence m, runtime::Context<Message>& ctx);
  void Handle(AddTokenSink m);
  void Handle(RunStep m, runtime::Context<Message>& ctx);
  void Handle(StepDone m, runtime::Context<Message>& ctx);
  void Handle(ReclaimReservation m, runtime::Context<Message>& ctx);
  void Handle(WritersGone m, runtime::Context<Message>& ctx);

 private:
  enum class State { kReserved, kRunning, kQuarantined };
  struct Held {
    Reservation reservation;
    std::string request_id;
    State state = State::kReserved;
    runtime::TimerId reclaim;
    std::string release_reason;
    std::string writer;  // who was sent the destination (Release.writer_id), when known
    int64_t arrival_us = 0;  // priority: the request that arrived last is preempted first
    // Running: prompt + tokens generated so far (the prefix cache keys its rows by them).
    std::vector<int32_t> tokens;
    // On a device: its prompt's copy there (done once its first step has enqueued it), and
    // whether its device rows can be trusted (not after a step that failed on the device).
    std::shared_ptr<PendingUpload> upload;
    bool device_rows_sure = true;
  };
  static constexpr size_t kMaxGoneWriters = 1024;

  // Frees the blocks of `id` and forgets it (its timer cancelled).
  void Free(uint64_t id, runtime::Context<Message>& ctx);
  // A running sequence ends with `rows` rows in its cache: with the prefix cache, its full
  // blocks are published (kept for later prompts) first; then Free.
  void FreeRunning(uint64_t id, int64_t rows, runtime::Context<Message>& ctx);
  // Stops a running sequence (out of the batch) and frees it; `reason` goes to the routers.
  // While a step is in flight, a sequence of that step is stopped when it is done.
  void StopRunning(uint64_t id, const std::string& reason, runtime::Context<Message>& ctx);
  // Out of the batch and the cache now, with `reason` to the routers (no step in flight).
  void StopNow(uint64_t id, const std::string& reason, runtime::Context<Message>& ctx);
  void Emit(v1::TokenEvent event);
  void ScheduleStep(runtime::Context<Message>& ctx);
  // Before a step: every running sequence gets the blocks its next step writes; when the cache
  // has none left, the sequences that arrived last are preempted until the rest fit.
  void MakeRoom(runtime::Context<Message>& ctx);
  void PublishLoad();

  engine::Transformer* transformer_;
  PagedLatentCache cache_;
  DecodeActorOptions options_;
  std::shared_ptr<LoadGauge> gauge_;
  std::unique_ptr<engine::PingPong> overlap_;  // with micro_batches 2
  engine::BatchDecoder decoder_;               // the step's while one is in flight
  bool stepping_ = false;                      // a step is on the executor
  std::vector<engine::DecodeSequence> joining_;        // started; join the next step
  std::map<uint64_t, std::string> stopping_;           // stop when the step is done: reason
  std::map<uint64_t, Held> held_;                  // by reservation (sequence) id
  std::map<std::string, uint64_t> by_request_;     // request id -> reservation id
  uint64_t max_issued_ = 0;                        // highest reservation id ever granted
  std::set<std::string> gone_writers_;             // reported dead (the last kMaxGoneWriters)
  std::deque<std::string> gone_order_;
  bool step_scheduled_ = false;
  std::vector<AddTokenSink> sinks_;
  uint64_t latent_tokens_ = 0, latent_bytes_ = 0, tokens_generated_ = 0;
  engine::SpeculativeStats speculative_;  // the decoder's, copied when a step is done
  uint64_t preemptions_ = 0;
  int32_t max_running_ = 0;
  // Last: destroyed first, so a step still running finishes while what it uses exists.
  std::unique_ptr<runtime::Executor> executor_;
};

// Decode service: every handler posts to the decode actor and returns.
class DecodeService final : public v1::Decode::CallbackService {
 public:
  explicit DecodeService(runtime::ActorRef<DecodeActor::Message> actor)
      : actor_(std::move(actor)) {}

  grpc::ServerUnaryReactor* Reserve(grpc::CallbackServerContext* ctx,
                                    const v1::ReserveRequest* request,
                                    v1::ReserveResponse* response) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const v1::ReleaseRequest* request,
                                    v1::ReleaseResponse* response) override;
  grpc::ServerUnaryReactor* Start(grpc::CallbackServerContext* ctx,
                                  const v1::StartRequest* request,
                                  v1::StartResponse* response) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* WritersGone(grpc::CallbackServerContext* ctx,
                                        const v1::WritersGoneRequest* request,
                                        v1::WritersGoneResponse* response) override;
  grpc::ServerWriteReactor<v1::TokenEvent>* StreamTokens(
      grpc::CallbackServerContext* ctx, const v1::StreamTokensRequest* request) override;

 private:
  runtime::ActorRef<DecodeActor::Message> actor_;
};

}  // namespace splitmoe::decode

#endif  // SPLITMOE_DECODE_DECODE_WORKER_H_
