// GenerationActor: the router's front door. It owns every public Generate request from the
// moment it is validated to its last event, the router's view of the prefill and decode workers
// (router-side load, one token stream per decode worker) and the calls to them. Messages:
//   UseServingWorkers  (registry actor)  the healthy prefill and decode workers changed
//   NewGeneration      (Generate)        a validated, tokenised request and its client stream
//   ClientGone         (Generate)        the client cancelled or disconnected
//   ReserveDone        (Decode.Reserve reply)  blocks reserved (or not) on a decode worker
//   RetryAdmission     (timer)           the cache was full: try again
//   PrefillDone        (Prefill.RunPrefill reply)  the first token, or why not
//   TokenStreamUp / DecodeTokenEvent / TokenStreamDown  (a decode worker's token stream)
//   ReconnectTokenStream (timer)
// A request: pick the least loaded prefill and decode workers -> Reserve on the decode worker ->
// RunPrefill with the destination (the prefill worker writes the latents over UCX, flushes and
// starts the sequence on the decode worker) -> the first token from the prefill reply, then the
// decode worker's tokens, detokenised with stop strings applied -> finish. Whatever ends a
// request early (client gone, failure, stop string) releases its reservation or running
// sequence on the decode worker and cancels its prefill. Every outbound call is asynchronous;
// replies come back as messages. Not thread-safe: the actor's thread only.
#ifndef SPLITMOE_ROUTER_GENERATION_ACTOR_H_
#define SPLITMOE_ROUTER_GENERATION_ACTOR_H_

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <optional>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "absl/time/time.h"
#include "common/model/config.h"
#include "common/rpc/server_stream.h"
#include "common/runtime/actor.h"
#include "common/tokenizer/text_stream.h"
#include "common/tokenizer/tokenizer.h"
#include "splitmoe/v1/generation.pb.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::router {

struct ServingWorker {
  std::string id;
  std::string address;
  v1::WorkerRole role = v1::WORKER_ROLE_UNSPECIFIED;
};
struct UseServingWorkers {
  std::vector<ServingWorker> workers;
};
struct NewGeneration {
  uint64_t serial = 0;  // unique per Generate call, assigned by the service
  v1::GenerateRequest request;
  std::vector<int32_t> prompt;
  absl::Time received;
  std::shared_ptr<rpc::ServerStream<v1::GenerateEvent>> stream;
};
struct ClientGone {
  uint64_t serial = 0;
};
struct ReserveDone {
  uint64_t serial = 0;
  std::string internal_id;
  std::string worker_id;
  absl::StatusOr<v1::ReserveResponse> result;
};
struct RetryAdmission {
  uint64_t serial = 0;
  bool queue_kick = false;  // the admission queue's timer: its head (whatever it is now) asks
};
struct PrefillDone {
  uint64_t serial = 0;
  std::string internal_id;  // the attempt it answers
  absl::StatusOr<v1::PrefillResponse> result;
};
struct TokenStreamUp {
  std::string worker_id;
  uint64_t stream = 0;
};
struct DecodeTokenEvent {
  std::string worker_id;
  v1::TokenEvent event;
};
struct TokenStreamDown {
  std::string worker_id;
  uint64_t stream = 0;
  absl::Status status;
};
struct ReconnectTokenStream {
  std::string worker_id;
};
// Timer while a request decodes: fails it if no token arrived since the last check.
struct CheckProgress {
  uint64_t serial = 0;
  int32_t tokens_seen = 0;
};

// What the front door shows in ClusterStatus; written by the generation actor, read by the
// registry actor. Thread-safe.
struct FrontDoorGauges {
  std::atomic<int32_t> requests_in_flight{0};
  // Requests moved to other workers after a worker failed (each move counted).
  std::atomic<uint64_t> request_failovers{0};
  // Requests admitted again after a decode worker preempted them (its cache could not grow).
  std::atomic<uint64_t> request_preemptions{0};

  // Where the router serves its metrics and HTTP API (set once they listen).
  void SetUrls(std::string metrics_url, std::string http_url) {
    std::lock_guard<std::mutex> lock(mu_);
    metrics_url_ = std::move(metrics_url);
    http_url_ = std::move(http_url);
  }
  std::pair<std::string, std::string> Urls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return {metrics_url_, http_url_};
  }

 private:
  mutable std::mutex mu_;
  std::string metrics_url_, http_url_;
};

struct GenerationOptions {
  // How long a request may wait for cache blocks before RESOURCE_EXHAUSTED.
  absl::Duration admission_timeout = absl::Minutes(10);
  // Deadline of a prompt's prefill and its latent transfer (Reserve's timeout).
  absl::Duration prefill_timeout = absl::Seconds(60);
  // A decoding request with no new token for this long fails (UNAVAILABLE): its decode worker
  // or the stream from it is stuck.
  absl::Duration progress_timeout = absl::Seconds(60);
  // Failover: a request whose prefill or decode worker fails (dies, its stream breaks, it
  // refuses with UNAVAILABLE) starts again on other workers from what it has produced so far
  // (prompt + generated tokens re-prefilled), at most this many times. 0: fail it instead.
  int32_t max_failovers = 5;
};

class GenerationActor {
 public:
  using Message =
      std::variant<UseServingWorkers, NewGeneration, ClientGone, ReserveDone, RetryAdmission,
                   PrefillDone, TokenStreamUp, DecodeTokenEvent, TokenStreamDown,
                   ReconnectTokenStream, CheckProgress>;

  GenerationActor(const model::ModelConfig& config, const tokenizer::Tokenizer* tokenizer,
                  GenerationOptions options, std::shared_ptr<FrontDoorGauges> gauges);
  ~GenerationActor();

  void Handle(UseServingWorkers m, runtime::Context<Message>& ctx);
  void Handle(NewGeneration m, runtime::Context<Message>& ctx);
  void Handle(ClientGone m);
  void Handle(ReserveDone m, runtime::Context<Message>& ctx);
  void Handle(RetryAdmission m, runtime::Context<Message>& ctx);
  void Handle(PrefillDone m, runtime::Context<Message>& ctx);
  void Handle(TokenStreamUp m);
  void Handle(DecodeTokenEvent m, runtime::Context<Message>& ctx);
  void Handle(TokenStreamDown m, runtime::Context<Message>& ctx);
  void Handle(ReconnectTokenStream m, runtime::Context<Message>& ctx);
  void Handle(CheckProgress m, runtime::Context<Message>& ctx);

 private:
  struct Worker {
    ServingWorker info;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::Prefill::Stub> prefill;
    std::unique_ptr<v1::Decode::Stub> decode;
    int32_t in_flight = 0;  // requests assigned here by this router
    // Decode workers: the token stream (its context, to cancel it) and whether it is open.
    std::shared_ptr<grpc::ClientContext> stream_ctx;
    uint64_t stream = 0;
    bool stream_up = false;
    bool leaving = false;  // out of service: its requests are moving away
    // Decode workers: the prefix blocks this router sent there (a guess at what its prefix
    // cache holds: the worker may have evicted them), keys in the order sent, bounded.
    int64_t block_tokens = 0;  // its cache's, from its first reservation
    std::unordered_map<uint64_t, int32_t> prefix_keys;
    std::deque<uint64_t> prefix_order;
  };
  enum class Stage { kAdmitting, kPrefilling, kDecoding };
  struct Request {
    uint64_t serial = 0;
    std::string internal_id;  // what workers know it by: unique in the cluster
    v1::GenerateRequest request;
    std::vector<int32_t> prompt;
    absl::Time received, admission_deadline;
    std::shared_ptr<rpc::ServerStream<v1::GenerateEvent>> stream;
    Stage stage = Stage::kAdmitting;
    std::string prefill_worker, decode_worker;
    std::string writer;  // the prefill worker this attempt's destination was sent to
    std::vector<std::string> decode_tried;  // full caches this admission round
    std::vector<std::string> too_small;     // decode workers whose whole cache is too small
    std::optional<v1::LatentDestination> destination;
    std::shared_ptr<grpc::ClientContext> prefill_ctx;
    bool prefill_sent = false;
    bool first_token_done = false;  // the request's first token (of any attempt) was emitted
    // This attempt's prefill reply has come: until then its decode worker's events wait in
    // `buffered` (they can overtake the reply; after a failover too).
    bool attempt_prefilled = false;
    std::vector<v1::TokenEvent> buffered;  // decode events that overtook the prefill reply
    std::unique_ptr<tokenizer::TextStream> text;
    int32_t completion_tokens = 0;
    int32_t cached_prompt_tokens = 0;  // of the first attempt's prompt (usage)
    absl::Time first_token_at;
    absl::Time last_token_at;
    // Every token emitted so far (a failover re-prefills prompt + generated), the failovers so
    // far and the workers that failed this request (chosen again only when nothing else serves).
    std::vector<int32_t> generated;
    int32_t failovers = 0;
    int32_t preemptions = 0;
    int32_t attempts = 0;  // names each attempt's internal id
    bool waited = false;   // has been in the admission queue
    std::vector<std::string> failed_workers;
  };

  void Admit(Request& r, runtime::Context<Message>& ctx);
  // The worker serving `r` failed with `why`: start again elsewhere from what has been produced
  // (a new attempt, with its own internal id), or finish with `why` when failover is spent or
  // the error is the request's own fault.
  void Failover(Request& r, const absl::Status& why, const std::string& failed_worker,
                runtime::Context<Message>& ctx);
  // A decode worker preempted `r` (its cache could not grow): admitted again from what it has
  // produced, as a failover is, without counting as one (at most kMaxPreemptions times).
  void Requeue(Request& r, runtime::Context<Message>& ctx);
  // The next attempt's internal id and a clean admission state.
  void NewAttempt(Request& r);
  // No decode worker has blocks for `r` now: it waits in the admission queue (first come, first
  // served; only the head asks the decode workers, every 20 ms), up to the admission timeout.
  void Enqueue(Request& r, runtime::Context<Message>& ctx);
  // Drops finished heads and schedules the head's next try (once).
  void KickQueue(runtime::Context<Message>& ctx);
  static constexpr int32_t kMaxPreemptions = 100;
  // Releases what the current attempt holds on workers (reservation or running sequence,
  // prefill call), as Abandon does, without forgetting the request.
  void ReleaseAttempt(Request& r, const std::string& reason);
  // Tokens still to generate, and the prompt the next prefill runs (prompt + generated).
  int32_t RemainingTokens(const Request& r) const;
  // Tells every decode worker that these prefill workers are dead (their quarantined blocks
  // are freed at once).
  void ReportWritersGone(const std::vector<std::string>& writers);
  void SendPrefill(Request& r, runtime::Context<Message>& ctx);
  // Emits one generated token; returns true when the request is over (finished).
  bool EmitToken(Request& r, int32_t token, const v1::TokenLogprob* logprob,
                 const std::string& worker_finish, const v1::PrefillResponse* first);
  // Ends the request: the last event (or `error`) to the client, then Forget.
  void FinishWithError(Request& r, const absl::Status& error);
  // Releases what the request holds on workers (reservation, running sequence, prefill call) and
  // forgets it.
  void Abandon(Request& r, const std::string& reason);
  // The decode worker holds nothing more for `r` (it freed it itself): forget it there.
  void DetachDecode(Request& r);
  void Forget(uint64_t serial);
  void OpenTokenStream(Worker& w, runtime::Context<Message>& ctx);
  void ReleaseOnDecode(const std::string& worker_id, const v1::LatentDestination& destination,
                       const std::string& internal_id, bool writer_done,
                       const std::string& writer_id, const std::string& reason);
  // Best effort, by request id: a reservation whose grant never reached this router.
  void CancelOnDecode(const std::string& worker_id, const std::string& internal_id);
  // Best effort, by request id and destination: the prefill worker stops the prompt or, if it
  // never saw it, releases its reservation as the writer (Prefill.CancelPrefill).
  void CancelOnPrefill(const std::string& worker_id, const v1::LatentDestination& destination,
                       const std::string& internal_id);
  Worker* FindWorker(const std::string& id);
  Worker* LeastLoaded(v1::WorkerRole role, const std::vector<std::string>& exclude);
  // LeastLoaded avoiding `avoid` when anything else serves.
  Worker* Preferred(v1::WorkerRole role, const std::vector<std::string>& exclude,
                    const std::vector<std::string>& avoid);
  // The decode worker for `r`: the one that likely holds the longest cached prefix of what the
  // prefill will run (prompt + generated), unless it is busier than the least loaded by more
  // than kPrefixLoadSlack requests; the least loaded otherwise (as Preferred).
  Worker* PickDecode(const Request& r, const std::vector<std::string>& exclude);
  // Whether `r` may start from a cached prefix (not while its prompt logprobs are to come).
  static bool PrefixEligible(const Request& r);
  // Remembers that `tokens`' whole blocks went to decode worker `w`.
  void NotePrefix(Worker& w, const std::vector<int32_t>& tokens);
  static constexpr int32_t kPrefixLoadSlack = 4;
  static constexpr size_t kMaxPrefixKeysPerWorker = size_t{1} << 16;

  const model::ModelConfig& config_;
  const tokenizer::Tokenizer* tokenizer_;
  GenerationOptions options_;
  std::shared_ptr<FrontDoorGauges> gauges_;
  std::map<std::string, Worker> workers_;  // by worker id
  std::map<uint64_t, Request> requests_;   // by serial
  std::map<std::string, uint64_t> by_public_id_, by_internal_id_;
  std::deque<uint64_t> waiting_;  // the admission queue, by serial
  bool queue_kick_scheduled_ = false;
  uint64_t next_stream_ = 1;
  std::string router_tag_;  // prefix of internal ids
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_GENERATION_ACTOR_H_
