#include "router/generation_actor.h"

#include <iostream>
#include <random>

#include "common/base/log.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/base/prefix_keys.h"
#include "absl/strings/str_format.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "router/router_metrics.h"

namespace splitmoe::router {
namespace {

using Ctx = runtime::Context<GenerationActor::Message>;

// Live token-stream reactors, so the actor's destructor can wait for them after cancelling.
std::atomic<int> live_token_streams{0};

// A decode worker's token stream, read by the router. Every callback only posts to the actor;
// gRPC deletes nothing here: the reactor deletes itself in OnDone.
class TokenStreamClient : public grpc::ClientReadReactor<v1::TokenEvent> {
 public:
  TokenStreamClient(std::shared_ptr<grpc::Channel> channel,
                    std::shared_ptr<grpc::ClientContext> ctx, std::string worker_id,
                    uint64_t stream, runtime::ActorRef<GenerationActor::Message> actor)
      : channel_(std::move(channel)),
        ctx_(std::move(ctx)),
        worker_id_(std::move(worker_id)),
        stream_(stream),
        actor_(std::move(actor)) {
    live_token_streams.fetch_add(1);
  }
  void Start(v1::Decode::Stub* stub, const std::string& router_id) {
    request_.set_router_id(router_id);
    stub->async()->StreamTokens(ctx_.get(), &request_, this);
    StartRead(&event_);
    StartCall();
  }
  void OnReadInitialMetadataDone(bool ok) override {
    if (ok) actor_.Send(TokenStreamUp{worker_id_, stream_});
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    actor_.Send(DecodeTokenEvent{worker_id_, std::move(event_)});
    event_ = v1::TokenEvent();
    StartRead(&event_);
  }
  void OnDone(const grpc::Status& status) override {
    actor_.Send(TokenStreamDown{worker_id_, stream_, rpc::FromGrpcStatus(status)});
    live_token_streams.fetch_sub(1);
    delete this;
  }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<grpc::ClientContext> ctx_;
  std::string worker_id_;
  uint64_t stream_;
  runtime::ActorRef<GenerationActor::Message> actor_;
  v1::StreamTokensRequest request_;
  v1::TokenEvent event_;
};

v1::SamplingParamsInternal InternalSampling(const v1::GenerateRequest& r,
                                            const model::ModelConfig& c) {
  v1::SamplingParamsInternal s;
  s.set_temperature(r.sampling().temperature());
  s.set_top_p(r.sampling().top_p());
  s.set_top_k(r.sampling().top_k());
  s.set_seed(r.sampling().seed());
  s.set_max_tokens(r.stop().max_tokens());
  *s.mutable_stop_token_ids() = r.stop().stop_token_ids();
  s.set_ignore_eos(r.stop().ignore_eos());
  s.set_eos_token_id(static_cast<int32_t>(c.eos_token_id));
  s.set_logprobs(r.logprobs());
  return s;
}

// A worker's failure as the client sees it: the code is kept, the worker is named.
absl::Status WorkerError(const std::string& role, const std::string& worker,
                         const absl::Status& status) {
  absl::StatusCode code = status.code();
  // Transport-level failures of a worker mean the cluster cannot serve this right now.
  if (code == absl::StatusCode::kInternal || code == absl::StatusCode::kUnknown) {
    code = absl::StatusCode::kUnavailable;
  }
  return absl::Status(code, absl::StrCat(role, " worker ", worker, ": ", status.message()));
}

// Whether a worker's failure is the worker's (it died, broke, stopped or is unreachable) rather
// than the request's: only then does another worker get the request.
bool WorkerFault(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kCancelled:  // the worker was stopped under the request
      return true;
    default:
      return false;
  }
}

}  // namespace

GenerationActor::GenerationActor(const model::ModelConfig& config,
                                 const tokenizer::Tokenizer* tokenizer, GenerationOptions options,
                                 std::shared_ptr<FrontDoorGauges> gauges)
    : config_(config),
      tokenizer_(tokenizer),
      options_(options),
      gauges_(gauges != nullptr ? std::move(gauges) : std::make_shared<FrontDoorGauges>()) {
  std::random_device rd;
  router_tag_ = absl::StrFormat("%08x", rd());
}

GenerationActor::~GenerationActor() {
  for (auto& [serial, r] : requests_) {
    if (r.prefill_ctx) r.prefill_ctx->TryCancel();
    r.stream->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "router is stopping"));
    CountRequestError(grpc::StatusCode::UNAVAILABLE);
    // Stop what decode workers hold for it (briefly, synchronously: the process is ending).
    Worker* w = FindWorker(r.decode_worker);
    if (w == nullptr || !r.destination) continue;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
    v1::ReleaseRequest release;
    release.set_reservation_id(r.destination->reservation_id());
    release.set_reason("router stopping");
    release.set_writer_done(!r.prefill_sent);
    release.set_request_id(r.internal_id);
    release.set_generation(r.destination->generation());
    v1::ReleaseResponse released;
    (void)w->decode->Release(&ctx, release, &released);
  }
  for (auto& [id, w] : workers_) {
    if (w.stream_ctx) w.stream_ctx->TryCancel();
  }
  for (int i = 0; i < 200 && live_token_streams.load() > 0; ++i) absl::SleepFor(absl::Milliseconds(10));
}

GenerationActor::Worker* GenerationActor::FindWorker(const std::string& id) {
  auto it = workers_.find(id);
  return it == workers_.end() ? nullptr : &it->second;
}

GenerationActor::Worker* GenerationActor::LeastLoaded(v1::WorkerRole role,
                                                      const std::vector<std::string>& exclude) {
  Worker* best = nullptr;
  for (auto& [id, w] : workers_) {
    if (w.info.role != role || w.leaving) continue;
    if (role == v1::WORKER_ROLE_DECODE && !w.stream_up) continue;
    if (std::find(exclude.begin(), exclude.end(), id) != exclude.end()) continue;
    if (best == nullptr || w.in_flight < best->in_flight) best = &w;
  }
  return best;
}

namespace {

// A request may start from a cached prefix unless its prompt logprobs are still to come (they
// need every prompt position computed).
bool PrefixEligibleRequest(bool first_token_done, int32_t prompt_logprobs) {
  return first_token_done || prompt_logprobs <= 0;
}

}  // namespace

bool GenerationActor::PrefixEligible(const Request& r) {
  return PrefixEligibleRequest(r.first_token_done, r.request.prompt_logprobs());
}

GenerationActor::Worker* GenerationActor::PickDecode(const Request& r,
                                                     const std::vector<std::string>& exclude) {
  Worker* least = Preferred(v1::WORKER_ROLE_DECODE, exclude, r.failed_workers);
  if (least == nullptr || !PrefixEligible(r)) return least;
  std::vector<int32_t> tokens = r.prompt;
  tokens.insert(tokens.end(), r.generated.begin(), r.generated.end());
  Worker* best = nullptr;
  size_t best_match = 0;
  for (auto& [id, w] : workers_) {
    if (w.info.role != v1::WORKER_ROLE_DECODE || w.leaving || !w.stream_up ||
        w.block_tokens <= 0 || w.in_flight > least->in_flight + kPrefixLoadSlack) {
      continue;
    }
    if (std::find(exclude.begin(), exclude.end(), id) != exclude.end()) continue;
    if (std::find(r.failed_workers.begin(), r.failed_workers.end(), id) != r.failed_workers.end())
      continue;
    // At most prompt - 1 tokens can be shared (the last one is computed).
    const std::vector<uint64_t> keys = PrefixKeys(
        absl::MakeConstSpan(tokens).subspan(0, tokens.empty() ? 0 : tokens.size() - 1),
        w.block_tokens);
    size_t match = 0;
    while (match < keys.size() && w.prefix_keys.count(keys[match])) ++match;
    if (match > best_match ||
        (match == best_match && best != nullptr && w.in_flight < best->in_flight)) {
      best = &w;
      best_match = match;
    }
  }
  return best_match > 0 ? best : least;
}

void GenerationActor::NotePrefix(Worker& w, const std::vector<int32_t>& tokens) {
  if (w.block_tokens <= 0) return;
  for (uint64_t key : PrefixKeys(tokens, w.block_tokens)) {
    ++w.prefix_keys[key];
    w.prefix_order.push_back(key);
  }
  while (w.prefix_order.size() > kMaxPrefixKeysPerWorker) {
    auto it = w.prefix_keys.find(w.prefix_order.front());
    if (it != w.prefix_keys.end() && --it->second == 0) w.prefix_keys.erase(it);
    w.prefix_order.pop_front();
  }
}

GenerationActor::Worker* GenerationActor::Preferred(v1::WorkerRole role,
                                                    const std::vector<std::string>& exclude,
                                                    const std::vector<std::string>& avoid) {
  std::vector<std::string> both = exclude;
  both.insert(both.end(), avoid.begin(), avoid.end());
  Worker* w = LeastLoaded(role, both);
  return w != nullptr ? w : LeastLoaded(role, exclude);
}

void GenerationActor::Handle(UseServingWorkers m, Ctx& ctx) {
  std::map<std::string, ServingWorker> next;
  for (ServingWorker& w : m.workers) next[w.id] = std::move(w);
  // Workers that left: their requests move to other workers now rather than wait for a timeout.
  std::vector<std::string> writers_gone;
  for (auto it = workers_.begin(); it != workers_.end();) {
    auto found = next.find(it->first);
    if (found != next.end() && found->second.address == it->second.info.address) {
      ++it;
      continue;
    }
    const std::string id = it->first;
    std::vector<uint64_t> affected;
    for (auto& [serial, r] : requests_) {
      if (r.prefill_worker == id || r.decode_worker == id) affected.push_back(serial);
    }
    if (it->second.stream_ctx) it->second.stream_ctx->TryCancel();
    if (it->second.info.role == v1::WORKER_ROLE_PREFILL) writers_gone.push_back(id);
    // Listed (never chosen) until its requests have moved, so what they hold there is released
    // on the way out in case it still lives.
    it->second.leaving = true;
    const absl::Status why = absl::UnavailableError(absl::StrCat("worker ", id, " left the cluster"));
    for (uint64_t serial : affected) {
      auto r = requests_.find(serial);
      if (r != requests_.end()) Failover(r->second, why, id, ctx);
    }
    it = workers_.erase(it);
  }
  // A dead writer puts nothing more: its quarantined blocks come back now.
  if (!writers_gone.empty()) ReportWritersGone(writers_gone);
  for (auto& [id, info] : next) {
    if (workers_.count(id)) continue;
    Worker w;
    w.info = info;
    w.channel = rpc::InternalChannel(info.address);
    if (info.role == v1::WORKER_ROLE_PREFILL) w.prefill = v1::Prefill::NewStub(w.channel);
    if (info.role == v1::WORKER_ROLE_DECODE) w.decode = v1::Decode::NewStub(w.channel);
    Worker& added = workers_.emplace(id, std::move(w)).first->second;
    if (info.role == v1::WORKER_ROLE_DECODE) OpenTokenStream(added, ctx);
  }
}

void GenerationActor::OpenTokenStream(Worker& w, Ctx& ctx) {
  w.stream = next_stream_++;
  w.stream_up = false;
  w.stream_ctx = std::make_shared<grpc::ClientContext>();
  auto* client =
      new TokenStreamClient(w.channel, w.stream_ctx, w.info.id, w.stream, ctx.self());
  client->Start(w.decode.get(), router_tag_);
}

void GenerationActor::Handle(TokenStreamUp m) {
  Worker* w = FindWorker(m.worker_id);
  if (w != nullptr && w->stream == m.stream) w->stream_up = true;
}

void GenerationActor::Handle(TokenStreamDown m, Ctx& ctx) {
  Worker* w = FindWorker(m.worker_id);
  if (w == nullptr || w->stream != m.stream) return;  // an old stream, or the worker left
  w->stream_up = false;
  w->stream_ctx.reset();
  SPLITMOE_LOG(WARNING, "router").With("worker", m.worker_id).With("status", m.status)
      << "a decode worker's token stream ended";
  // Sequences on it cannot be followed any more.
  std::vector<uint64_t> affected;
  for (auto& [serial, r] : requests_) {
    if (r.decode_worker == m.worker_id && r.stage != Stage::kAdmitting) affected.push_back(serial);
  }
  for (uint64_t serial : affected) {
    auto r = requests_.find(serial);
    if (r == requests_.end()) continue;
    Failover(r->second,
             absl::UnavailableError(absl::StrCat("lost the token stream of decode worker ",
                                                 m.worker_id, ": ", m.status.message())),
             m.worker_id, ctx);
  }
  ctx.ScheduleAfter(absl::Milliseconds(500), ReconnectTokenStream{m.worker_id});
}

void GenerationActor::Handle(ReconnectTokenStream m, Ctx& ctx) {
  Worker* w = FindWorker(m.worker_id);
  if (w != nullptr && w->stream_ctx == nullptr) OpenTokenStream(*w, ctx);
}

void GenerationActor::Handle(NewGeneration m, Ctx& ctx) {
  const std::string public_id =
      m.request.request_id().empty() ? absl::StrCat("req-", m.serial) : m.request.request_id();
  if (by_public_id_.count(public_id)) {
    m.stream->Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("request id '", public_id, "' is already in flight")));
    CountRequestError(grpc::StatusCode::INVALID_ARGUMENT);
    return;
  }
  if (m.stream->closed()) return;  // the client left while the request was queued
  Request r;
  r.serial = m.serial;
  r.internal_id = absl::StrCat(router_tag_, "-", m.serial);
  r.request = std::move(m.request);
  r.request.set_request_id(public_id);
  r.prompt = std::move(m.prompt);
  r.received = m.received;
  r.admission_deadline = absl::Now() + options_.admission_timeout;
  r.stream = std::move(m.stream);
  r.text = std::make_unique<tokenizer::TextStream>(
      tokenizer_, std::vector<std::string>(r.request.stop().stop().begin(),
                                           r.request.stop().stop().end()));
  by_public_id_[public_id] = r.serial;
  by_internal_id_[r.internal_id] = r.serial;
  Request& stored = requests_.emplace(r.serial, std::move(r)).first->second;
  gauges_->requests_in_flight.store(static_cast<int32_t>(requests_.size()));
  Admit(stored, ctx);
}

void GenerationActor::Admit(Request& r, Ctx& ctx) {
  if (LeastLoaded(v1::WORKER_ROLE_PREFILL, {}) == nullptr) {
    FinishWithError(r, absl::UnavailableError("no prefill worker is serving"));
    return;
  }
  if (RemainingTokens(r) == 1) {  // the prefill's token is all: no decode worker
    SendPrefill(r, ctx);
    return;
  }
  // First come, first served: while requests wait for cache blocks, a new one waits behind
  // them (only the head of the queue asks the decode workers).
  if (!waiting_.empty() && waiting_.front() != r.serial) {
    Enqueue(r, ctx);
    return;
  }
  std::vector<std::string> exclude = r.decode_tried;
  exclude.insert(exclude.end(), r.too_small.begin(), r.too_small.end());
  Worker* decode = PickDecode(r, exclude);
  if (decode == nullptr) {
    if (LeastLoaded(v1::WORKER_ROLE_DECODE, {}) == nullptr) {
      FinishWithError(r, absl::UnavailableError("no decode worker is serving"));
      return;
    }
    if (LeastLoaded(v1::WORKER_ROLE_DECODE, r.too_small) == nullptr) {
      FinishWithError(r, absl::ResourceExhaustedError(absl::StrCat(
                             r.prompt.size(), " prompt tokens + max_tokens ",
                             r.request.stop().max_tokens(),
                             " do not fit in any decode worker's whole cache")));
      return;
    }
    // Every decode worker's cache is full: wait for blocks, up to the admission timeout.
    if (absl::Now() >= r.admission_deadline) {
      FinishWithError(r, absl::ResourceExhaustedError(absl::StrCat(
                             "no decode worker had cache blocks for ", r.prompt.size(),
                             " + ", r.request.stop().max_tokens(), " tokens within ",
                             absl::FormatDuration(options_.admission_timeout))));
      return;
    }
    r.decode_tried.clear();
    Enqueue(r, ctx);
    return;
  }
  if (!waiting_.empty() && waiting_.front() == r.serial) {
    waiting_.pop_front();
    KickQueue(ctx);  // the next one may fit too
  }
  r.decode_worker = decode->info.id;
  ++decode->in_flight;
  struct Call {
    grpc::ClientContext ctx;
    v1::ReserveRequest request;
    v1::ReserveResponse response;
  };
  auto call = std::make_shared<Call>();
  call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  call->request.set_request_id(r.internal_id);
  call->request.set_prompt_tokens(static_cast<int32_t>(r.prompt.size() + r.generated.size()));
  call->request.set_max_tokens(RemainingTokens(r));
  call->request.set_arrival_us(absl::ToUnixMicros(r.received));
  if (PrefixEligible(r)) {
    call->request.mutable_prompt()->Add(r.prompt.begin(), r.prompt.end());
    call->request.mutable_prompt()->Add(r.generated.begin(), r.generated.end());
  }
  call->request.set_timeout_ms(
      static_cast<int32_t>(absl::ToInt64Milliseconds(options_.prefill_timeout)));
  decode->decode->async()->Reserve(
      &call->ctx, &call->request, &call->response,
      [call, self = ctx.self(), serial = r.serial, internal_id = r.internal_id,
       worker = decode->info.id](grpc::Status s) {
        absl::StatusOr<v1::ReserveResponse> result =
            s.ok() ? absl::StatusOr<v1::ReserveResponse>(std::move(call->response))
                   : absl::StatusOr<v1::ReserveResponse>(rpc::FromGrpcStatus(s));
        self.Send(ReserveDone{serial, internal_id, worker, std::move(result)});
      });
}

void GenerationActor::Enqueue(Request& r, Ctx& ctx) {
  if (std::find(waiting_.begin(), waiting_.end(), r.serial) == waiting_.end()) {
    // One that already waited at the head, was preempted or has started streaming goes back to
    // the front: it came before everything behind it.
    if (r.waited || r.preemptions > 0 || r.first_token_done) {
      waiting_.push_front(r.serial);
    } else {
      waiting_.push_back(r.serial);
    }
    r.waited = true;
  }
  KickQueue(ctx);
}

void GenerationActor::KickQueue(Ctx& ctx) {
  while (!waiting_.empty()) {
    auto it = requests_.find(waiting_.front());
    if (it != requests_.end() && it->second.stage == Stage::kAdmitting) break;
    waiting_.pop_front();  // gone, or admitted by another path
  }
  if (waiting_.empty() || queue_kick_scheduled_) return;
  queue_kick_scheduled_ = true;
  ctx.ScheduleAfter(absl::Milliseconds(20), RetryAdmission{0, /*queue_kick=*/true});
}

void GenerationActor::Handle(RetryAdmission m, Ctx& ctx) {
  if (m.queue_kick) {  // the queue's head asks again
    queue_kick_scheduled_ = false;
    while (!waiting_.empty() && !requests_.count(waiting_.front())) waiting_.pop_front();
    if (waiting_.empty()) return;
    m.serial = waiting_.front();
  }
  auto it = requests_.find(m.serial);
  if (it != requests_.end() && it->second.stage == Stage::kAdmitting &&
      it->second.decode_worker.empty() && it->second.prefill_worker.empty()) {
    Admit(it->second, ctx);
  }
  if (m.queue_kick) KickQueue(ctx);  // the head may have finished (its deadline): the next one
}

void GenerationActor::Handle(ReserveDone m, Ctx& ctx) {
  auto it = requests_.find(m.serial);
  if (it == requests_.end()) {
    // The client left meanwhile: no writer ever saw these blocks.
    if (m.result.ok()) {
      ReleaseOnDecode(m.worker_id, m.result->destination(), m.internal_id, true, "",
                      "client left before prefill");
    } else {
      CancelOnDecode(m.worker_id, m.internal_id);
    }
    return;
  }
  Request& r = it->second;
  if (m.internal_id != r.internal_id) {
    // An earlier attempt's reservation (the request moved on meanwhile): nobody will write it.
    if (m.result.ok()) {
      ReleaseOnDecode(m.worker_id, m.result->destination(), m.internal_id, true, "",
                      "superseded attempt");
    } else {
      CancelOnDecode(m.worker_id, m.internal_id);
    }
    return;
  }
  if (Worker* w = FindWorker(m.worker_id)) --w->in_flight;
  r.decode_worker.clear();
  if (!m.result.ok()) {
    if (m.result.status().code() == absl::StatusCode::kResourceExhausted) {
      r.decode_tried.push_back(m.worker_id);
      Admit(r, ctx);  // another decode worker, or wait
      return;
    }
    if (m.result.status().code() == absl::StatusCode::kOutOfRange) {
      r.too_small.push_back(m.worker_id);
      Admit(r, ctx);  // another decode worker, or RESOURCE_EXHAUSTED now
      return;
    }
    // A lost reply may hide a granted reservation: cancel it by request id.
    CancelOnDecode(m.worker_id, r.internal_id);
    Failover(r, WorkerError("decode", m.worker_id, m.result.status()), m.worker_id, ctx);
    return;
  }
  Worker* w = FindWorker(m.worker_id);
  if (w != nullptr && !w->stream_up) {
    // Its token stream broke meanwhile: the tokens would go nowhere. Give the blocks back (no
    // writer saw them) and choose again.
    ReleaseOnDecode(m.worker_id, m.result->destination(), r.internal_id, true, "",
                    "token stream down");
    r.decode_tried.push_back(m.worker_id);
    Admit(r, ctx);
    return;
  }
  if (w == nullptr || w->leaving) {
    // Left meanwhile: what it granted goes with it (released, no writer saw it, in case it
    // still lives).
    ReleaseOnDecode(m.worker_id, m.result->destination(), r.internal_id, true, "",
                    "decode worker left the cluster");
    Failover(r, absl::UnavailableError(absl::StrCat("decode worker ", m.worker_id,
                                                    " left the cluster")),
             m.worker_id, ctx);
    return;
  }
  ++w->in_flight;
  r.decode_worker = m.worker_id;
  r.destination = m.result->destination();
  if (PrefixEligible(r)) {
    w->block_tokens = r.destination->block_tokens();
    std::vector<int32_t> tokens = r.prompt;
    tokens.insert(tokens.end(), r.generated.begin(), r.generated.end());
    NotePrefix(*w, tokens);
  }
  r.destination->set_decode_worker_id(m.worker_id);
  r.destination->set_decode_address(w->info.address);
  SendPrefill(r, ctx);
}

void GenerationActor::SendPrefill(Request& r, Ctx& ctx) {
  Worker* prefill = Preferred(v1::WORKER_ROLE_PREFILL, {}, r.failed_workers);
  if (prefill == nullptr) {
    FinishWithError(r, absl::UnavailableError("no prefill worker is serving"));
    return;
  }
  r.stage = Stage::kPrefilling;
  r.prefill_worker = prefill->info.id;
  r.writer = prefill->info.id;
  ++prefill->in_flight;
  struct Call {
    v1::PrefillRequest request;
    v1::PrefillResponse response;
  };
  auto call = std::make_shared<Call>();
  r.prefill_ctx = std::make_shared<grpc::ClientContext>();
  r.prefill_ctx->set_deadline(std::chrono::system_clock::now() +
                              absl::ToChronoMilliseconds(options_.prefill_timeout));
  call->request.set_request_id(r.internal_id);
  // After a failover the prompt is what the request has produced so far: the next token is
  // sampled at the same position, with the same (seed, position) key, as it would have been.
  *call->request.mutable_prompt() = {r.prompt.begin(), r.prompt.end()};
  call->request.mutable_prompt()->Add(r.generated.begin(), r.generated.end());
  *call->request.mutable_sampling() = InternalSampling(r.request, config_);
  call->request.mutable_sampling()->set_max_tokens(RemainingTokens(r));
  call->request.set_prompt_logprobs(r.first_token_done ? 0 : r.request.prompt_logprobs());
  if (r.destination) *call->request.mutable_destination() = *r.destination;
  r.prefill_sent = true;
  prefill->prefill->async()->RunPrefill(
      r.prefill_ctx.get(), &call->request, &call->response,
      [call, pctx = r.prefill_ctx, self = ctx.self(), serial = r.serial,
       internal_id = r.internal_id](grpc::Status s) {
        absl::StatusOr<v1::PrefillResponse> result =
            s.ok() ? absl::StatusOr<v1::PrefillResponse>(std::move(call->response))
                   : absl::StatusOr<v1::PrefillResponse>(rpc::FromGrpcStatus(s));
        self.Send(PrefillDone{serial, internal_id, std::move(result)});
      });
}

void GenerationActor::Handle(PrefillDone m, Ctx& ctx) {
  auto it = requests_.find(m.serial);
  if (it == requests_.end()) return;  // abandoned: the reservation was released then
  Request& r = it->second;
  if (m.internal_id != r.internal_id) return;  // an earlier attempt: released when it moved on
  if (Worker* w = FindWorker(r.prefill_worker)) --w->in_flight;
  const std::string prefill_worker = r.prefill_worker;
  r.prefill_worker.clear();
  r.prefill_ctx.reset();
  if (!m.result.ok()) {
    const absl::Status error = WorkerError("prefill", prefill_worker, m.result.status());
    if (WorkerFault(m.result.status())) {
      Failover(r, error, prefill_worker, ctx);
    } else {
      FinishWithError(r, error);
    }
    return;
  }
  const v1::PrefillResponse& p = *m.result;
  const bool first = !r.first_token_done;  // not a failover's continuation
  r.first_token_done = true;
  r.attempt_prefilled = true;
  const bool decoding = r.destination.has_value() && p.finish_reason().empty();
  if (decoding) {
    r.stage = Stage::kDecoding;
    ctx.ScheduleAfter(options_.progress_timeout, CheckProgress{r.serial, 1});
  } else if (r.destination) {
    DetachDecode(r);  // the prefill worker released the reservation (the first token ended it)
  }
  if (EmitToken(r, p.first_token(), p.has_first_token_logprob() ? &p.first_token_logprob() : nullptr,
                p.finish_reason(), first ? &p : nullptr)) {
    return;
  }
  // Decode events that arrived before this reply, in order.
  std::vector<v1::TokenEvent> buffered = std::move(r.buffered);
  const uint64_t serial = r.serial;
  for (v1::TokenEvent& e : buffered) {
    auto again = requests_.find(serial);
    if (again == requests_.end()) return;
    Handle(DecodeTokenEvent{again->second.decode_worker, std::move(e)}, ctx);
  }
}

void GenerationActor::Handle(DecodeTokenEvent m, Ctx& ctx) {
  auto found = by_internal_id_.find(m.event.request_id());
  if (found == by_internal_id_.end()) return;  // finished or abandoned already
  Request& r = requests_.at(found->second);
  if (r.decode_worker != m.worker_id) return;
  if (!r.attempt_prefilled) {
    r.buffered.push_back(std::move(m.event));
    return;
  }
  const v1::TokenEvent& e = m.event;
  if (e.finished() && e.token() < 0) {  // the sequence ended without a token: why?
    DetachDecode(r);  // the decode worker already freed everything
    const absl::Status why = absl::UnavailableError(absl::StrCat(
        "decode worker ", m.worker_id, " stopped the sequence: ", e.finish_reason()));
    // A failed step (its experts or the worker failing) moves on; a cancel does not; a
    // preempted sequence (the worker's cache could not grow) is admitted again.
    if (e.finish_reason() == "preempted") {
      Requeue(r, ctx);
    } else if (absl::StartsWith(e.finish_reason(), "error")) {
      Failover(r, why, m.worker_id, ctx);
    } else {
      FinishWithError(r, why);
    }
    return;
  }
  if (e.finished()) {
    DetachDecode(r);  // the decode worker freed the sequence with its last token
  }
  EmitToken(r, e.token(), e.has_logprob() ? &e.logprob() : nullptr, e.finish_reason(), nullptr);
}

bool GenerationActor::EmitToken(Request& r, int32_t token, const v1::TokenLogprob* logprob,
                                const std::string& worker_finish,
                                const v1::PrefillResponse* first) {
  const absl::Time now = absl::Now();
  ++r.completion_tokens;
  r.generated.push_back(token);
  if (first != nullptr) r.first_token_at = now;
  if (r.completion_tokens == 1) {
    ObserveTimeToFirstToken(now - r.received);
  } else {
    ObserveTimePerOutputToken(now - r.last_token_at);
  }
  r.last_token_at = now;
  CountOutputToken();
  bool stopped = false;
  const bool last = !worker_finish.empty();
  absl::StatusOr<std::string> piece = r.text->Push(token, last, &stopped);
  if (!piece.ok()) {
    FinishWithError(r, absl::InternalError(
                           absl::StrCat("detokenising token ", token, ": ", piece.status().message())));
    return true;
  }
  v1::GenerateEvent event;
  event.set_request_id(r.request.request_id());
  event.add_token_ids(token);
  event.set_text(*piece);
  if (r.request.logprobs() > 0 && logprob != nullptr) *event.add_logprobs() = *logprob;
  if (first != nullptr && r.request.prompt_logprobs() > 0) {
    *event.mutable_prompt_logprobs() = first->prompt_logprobs();
  }
  if (first != nullptr && r.completion_tokens == 1) {  // the public prompt's prefill
    r.cached_prompt_tokens = std::min(first->cached_tokens(), static_cast<int32_t>(r.prompt.size()));
  }
  const bool finished = last || stopped;
  if (finished) {
    event.set_finished(true);
    event.set_finish_reason(stopped || worker_finish == "stop" ? v1::FINISH_REASON_STOP
                                                               : v1::FINISH_REASON_LENGTH);
    v1::Usage* usage = event.mutable_usage();
    usage->set_prompt_tokens(static_cast<int32_t>(r.prompt.size()));
    usage->set_completion_tokens(r.completion_tokens);
    usage->set_cached_prompt_tokens(r.cached_prompt_tokens);
    usage->set_time_to_first_token_ms(absl::ToDoubleMilliseconds(r.first_token_at - r.received));
    usage->set_total_time_ms(absl::ToDoubleMilliseconds(now - r.received));
  }
  r.stream->Write(std::move(event));
  if (!finished) return false;
  r.stream->Finish(grpc::Status::OK);
  CountRequestOk();
  ObserveEndToEnd(now - r.received, static_cast<int32_t>(r.prompt.size()), r.completion_tokens);
  // A stop string ended it while the decode worker still runs the sequence: stop that too.
  Abandon(r, "finished at a stop string");
  return true;
}

void GenerationActor::DetachDecode(Request& r) {
  if (Worker* w = FindWorker(r.decode_worker)) --w->in_flight;
  r.decode_worker.clear();
  r.destination.reset();
}

void GenerationActor::FinishWithError(Request& r, const absl::Status& error) {
  r.stream->Finish(rpc::ToGrpcStatus(error));
  CountRequestError(static_cast<grpc::StatusCode>(error.code()));
  Abandon(r, std::string(error.message()));
}

void GenerationActor::Handle(ClientGone m) {
  auto it = requests_.find(m.serial);
  if (it == requests_.end()) return;
  CountRequestCancelled();
  Abandon(it->second, "client cancelled");
}

void GenerationActor::Abandon(Request& r, const std::string& reason) {
  ReleaseAttempt(r, reason);
  Forget(r.serial);
}

void GenerationActor::ReleaseAttempt(Request& r, const std::string& reason) {
  if (r.prefill_ctx) {
    // The prefill worker stops, flushes and releases as the writer. The call's cancel does not
    // reach it when the call itself never did; the cancel by name does, and makes the worker
    // release (and refuse the prompt, should it still arrive), so the reservation never waits
    // out its deadline for a writer that will not come.
    r.prefill_ctx->TryCancel();
    if (r.destination) CancelOnPrefill(r.prefill_worker, *r.destination, r.internal_id);
  }
  r.prefill_ctx.reset();
  if (Worker* w = FindWorker(r.prefill_worker)) --w->in_flight;
  r.prefill_worker.clear();
  if (!r.decode_worker.empty()) {
    if (Worker* w = FindWorker(r.decode_worker)) --w->in_flight;
    if (r.destination) {
      // Running: stopped and freed at once. Reserved: refused from now on; the blocks are
      // reused once the writer confirms, or is known dead (WritersGone), or immediately if no
      // writer ever saw them.
      ReleaseOnDecode(r.decode_worker, *r.destination, r.internal_id, !r.prefill_sent,
                      r.prefill_sent ? r.writer : "", reason);
    }
    // Still admitting (Reserve in flight): ReserveDone releases what it got.
  }
  r.decode_worker.clear();
  r.destination.reset();
}

int32_t GenerationActor::RemainingTokens(const Request& r) const {
  return r.request.stop().max_tokens() - static_cast<int32_t>(r.generated.size());
}

void GenerationActor::Failover(Request& r, const absl::Status& why,
                               const std::string& failed_worker, Ctx& ctx) {
  if (r.failovers >= options_.max_failovers || r.stream->closed() || RemainingTokens(r) <= 0) {
    FinishWithError(r, why);
    return;
  }
  ++r.failovers;
  gauges_->request_failovers.fetch_add(1);
  SPLITMOE_LOG(WARNING, "router").With("request", r.request.request_id())
          .With("failover", r.failovers).With("tokens_produced", r.generated.size())
      << "request moves to other workers: " << why.message();
  ReleaseAttempt(r, absl::StrCat("failover: ", why.message()));
  if (!failed_worker.empty()) r.failed_workers.push_back(failed_worker);
  NewAttempt(r);
  // At once the first time; then a short back-off, so a cluster still noticing a death is not
  // asked again and again.
  ctx.ScheduleAfter(absl::Milliseconds(50) * (r.failovers - 1), RetryAdmission{r.serial});
}

void GenerationActor::Requeue(Request& r, Ctx& ctx) {
  if (r.preemptions >= kMaxPreemptions || r.stream->closed() || RemainingTokens(r) <= 0) {
    FinishWithError(r, absl::ResourceExhaustedError(absl::StrCat(
                           "preempted ", r.preemptions, " times: the decode caches are too small "
                           "for the load")));
    return;
  }
  ++r.preemptions;
  gauges_->request_preemptions.fetch_add(1);
  SPLITMOE_LOG(INFO, "router").With("request", r.request.request_id())
          .With("preemption", r.preemptions).With("tokens_produced", r.generated.size())
      << "sequence preempted by its decode worker: admitted again";
  ReleaseAttempt(r, "preempted");
  NewAttempt(r);
  ctx.ScheduleAfter(absl::Milliseconds(10), RetryAdmission{r.serial});
}

void GenerationActor::NewAttempt(Request& r) {
  // A new attempt with its own id: nothing of the old one (a late reply, a token event, a
  // release) can touch it.
  ++r.attempts;
  by_internal_id_.erase(r.internal_id);
  r.internal_id = absl::StrCat(router_tag_, "-", r.serial, ".", r.attempts);
  by_internal_id_[r.internal_id] = r.serial;
  r.stage = Stage::kAdmitting;
  r.writer.clear();
  r.prefill_sent = false;
  r.attempt_prefilled = false;
  r.buffered.clear();
  r.decode_tried.clear();
  r.too_small.clear();
  r.admission_deadline = absl::Now() + options_.admission_timeout;
}

void GenerationActor::ReportWritersGone(const std::vector<std::string>& writers) {
  for (auto& [id, w] : workers_) {
    if (w.info.role != v1::WORKER_ROLE_DECODE || w.leaving) continue;
    struct Call {
      grpc::ClientContext ctx;
      v1::WritersGoneRequest request;
      v1::WritersGoneResponse response;
    };
    auto call = std::make_shared<Call>();
    call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    *call->request.mutable_writer_ids() = {writers.begin(), writers.end()};
    w.decode->async()->WritersGone(&call->ctx, &call->request, &call->response,
                                   [call](grpc::Status) {});
  }
}

void GenerationActor::Forget(uint64_t serial) {
  auto it = requests_.find(serial);
  if (it == requests_.end()) return;
  by_public_id_.erase(it->second.request.request_id());
  by_internal_id_.erase(it->second.internal_id);
  requests_.erase(it);
  gauges_->requests_in_flight.store(static_cast<int32_t>(requests_.size()));
}

void GenerationActor::Handle(CheckProgress m, Ctx& ctx) {
  auto it = requests_.find(m.serial);
  if (it == requests_.end() || it->second.stage != Stage::kDecoding) return;
  Request& r = it->second;
  if (r.completion_tokens == m.tokens_seen) {
    const std::string stuck = r.decode_worker;
    Failover(r, absl::UnavailableError(absl::StrCat(
                    "decode worker ", stuck, " produced no token for ",
                    absl::FormatDuration(options_.progress_timeout))),
             stuck, ctx);
    return;
  }
  ctx.ScheduleAfter(options_.progress_timeout, CheckProgress{r.serial, r.completion_tokens});
}

void GenerationActor::CancelOnDecode(const std::string& worker_id, const std::string& internal_id) {
  Worker* w = FindWorker(worker_id);
  if (w == nullptr) return;
  struct Call {
    grpc::ClientContext ctx;
    v1::CancelRequest request;
    v1::CancelResponse response;
  };
  auto call = std::make_shared<Call>();
  call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  call->request.set_request_id(internal_id);
  call->request.set_router_id(router_tag_);
  // INVALID_ARGUMENT (unknown request) is the common answer: nothing was granted.
  w->decode->async()->Cancel(&call->ctx, &call->request, &call->response,
                             [call](grpc::Status) {});
}

void GenerationActor::CancelOnPrefill(const std::string& worker_id,
                                      const v1::LatentDestination& destination,
                                      const std::string& internal_id) {
  Worker* w = FindWorker(worker_id);
  if (w == nullptr || w->prefill == nullptr) return;  // gone: WritersGone frees its reservations
  struct Call {
    grpc::ClientContext ctx;
    v1::CancelPrefillRequest request;
    v1::CancelPrefillResponse response;
  };
  auto call = std::make_shared<Call>();
  call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  call->request.set_request_id(internal_id);
  *call->request.mutable_destination() = destination;
  w->prefill->async()->CancelPrefill(
      &call->ctx, &call->request, &call->response, [call, worker_id](grpc::Status s) {
        // UNAVAILABLE: the worker is gone; the decode worker frees what it wrote on WritersGone.
        if (!s.ok() && s.error_code() != grpc::StatusCode::UNAVAILABLE) {
          SPLITMOE_LOG(WARNING, "router").With("worker", worker_id)
              << "cancel on the prefill worker failed: " << s.error_message();
        }
      });
}

void GenerationActor::ReleaseOnDecode(const std::string& worker_id,
                                      const v1::LatentDestination& destination,
                                      const std::string& internal_id, bool writer_done,
                                      const std::string& writer_id, const std::string& reason) {
  Worker* w = FindWorker(worker_id);
  if (w == nullptr) return;  // gone: its reservations went with it
  struct Call {
    grpc::ClientContext ctx;
    v1::ReleaseRequest request;
    v1::ReleaseResponse response;
  };
  auto call = std::make_shared<Call>();
  call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  call->request.set_reservation_id(destination.reservation_id());
  call->request.set_reason(reason);
  call->request.set_writer_done(writer_done);
  call->request.set_request_id(internal_id);
  call->request.set_generation(destination.generation());
  call->request.set_writer_id(writer_id);
  w->decode->async()->Release(&call->ctx, &call->request, &call->response,
                              [call, worker_id](grpc::Status s) {
                                // UNAVAILABLE: the worker is gone, and its blocks with it.
                                if (!s.ok() && s.error_code() != grpc::StatusCode::UNAVAILABLE) {
                                  SPLITMOE_LOG(WARNING, "router").With("worker", worker_id)
                                      << "release on the decode worker failed: "
                                      << s.error_message();
                                }
                              });
}

}  // namespace splitmoe::router
