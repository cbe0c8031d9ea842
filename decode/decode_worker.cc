#include "decode/decode_worker.h"

#include <algorithm>
#include <iostream>
#include <set>

#include "common/base/log.h"
#include "absl/strings/str_cat.h"
#include "common/engine/request_check.h"
#include "common/rpc/security.h"
#include "common/rpc/rpc.h"
#include "decode/paged_sequence_cache.h"

namespace splitmoe::decode {

std::string RequestOwner(const std::string& request_id) {
  const size_t dash = request_id.find('-');
  return dash == std::string::npos ? std::string() : request_id.substr(0, dash);
}

namespace {

// The fence value a reservation is known by: the generation of its first block when granted.
uint64_t Fence(const Reservation& r) { return r.generations.empty() ? 0 : r.generations[0]; }

// Rows a sequence's caches hold in every layer: the main layers', and the MTP module's (which
// trails them by the tokens it has not drafted from yet) when it speculates: what its blocks may
// be published with.
int64_t RowsInEveryLayer(const engine::DecodeSequence& seq) {
  int64_t rows = seq.cache->length();
  if (seq.mtp_cache != nullptr) rows = std::min(rows, seq.mtp_cache->length());
  return rows;
}

}  // namespace

DecodeActor::DecodeActor(engine::Transformer* transformer, PagedLatentCache cache,
                         DecodeActorOptions options, std::shared_ptr<LoadGauge> gauge,
                         std::unique_ptr<runtime::Executor> executor)
    : transformer_(transformer),
      cache_(std::move(cache)),
      options_(std::move(options)),
      gauge_(std::move(gauge)),
      overlap_(options_.micro_batches >= 2 ? std::make_unique<engine::PingPong>() : nullptr),
      decoder_(transformer, transformer->config().eos_token_id, overlap_.get(),
               options_.draft_tokens),
      executor_(std::move(executor)) {
  PublishLoad();
}

void DecodeActor::Handle(ReserveBlocks m, runtime::Context<Message>& ctx) {
  const v1::ReserveRequest& r = m.request;
  const model::ModelConfig& c = transformer_->config();
  if (r.request_id().empty()) {
    m.reply(absl::InvalidArgumentError("reserve: empty request id"));
    return;
  }
  if (by_request_.count(r.request_id())) {
    m.reply(absl::InvalidArgumentError(
        absl::StrCat("reserve: request ", r.request_id(), " already holds a reservation")));
    return;
  }
  if (r.prompt_tokens() <= 0 || r.max_tokens() <= 0 || r.timeout_ms() < 0 ||
      r.timeout_ms() > kMaxReservationTimeoutMs) {
    m.reply(absl::InvalidArgumentError(
        absl::StrCat("reserve: prompt_tokens ", r.prompt_tokens(), " and max_tokens ",
                     r.max_tokens(), " must be > 0, timeout_ms in [0, ",
                     kMaxReservationTimeoutMs, "]")));
    return;
  }
  if (absl::Status s = engine::CheckContext(c, r.prompt_tokens(), r.max_tokens()); !s.ok()) {
    m.reply(absl::InvalidArgumentError(absl::StrCat("reserve: ", s.message())));
    return;
  }
  const int64_t needed = cache_.BlocksFor(static_cast<int64_t>(r.prompt_tokens()) + r.max_tokens());
  if (needed > cache_.num_blocks()) {
    // Not a wait-and-retry case: it can never fit here.
    m.reply(absl::OutOfRangeError(absl::StrCat(
        "reserve: ", r.prompt_tokens(), " + ", r.max_tokens(), " tokens need ", needed,
        " blocks, this worker's whole cache has ", cache_.num_blocks())));
    return;
  }
  if (r.prompt_size() != 0 && r.prompt_size() != r.prompt_tokens()) {
    m.reply(absl::InvalidArgumentError(absl::StrCat("reserve: ", r.prompt_size(),
                                                    " prompt ids for ", r.prompt_tokens(),
                                                    " prompt tokens")));
    return;
  }
  const absl::Span<const int32_t> prompt(r.prompt().data(), static_cast<size_t>(r.prompt_size()));
  // Admission by a token budget: the prompt (less its cached prefix) and a margin now, and one
  // free block left per live sequence for the blocks they take as they decode.
  int64_t extra = r.max_tokens();
  if (!options_.reserve_upfront) {
    const int64_t margin = options_.reserve_margin_tokens > 0 ? options_.reserve_margin_tokens
                                                              : cache_.layout().block_tokens;
    extra = std::min<int64_t>(r.max_tokens(), margin);
    const int64_t headroom = static_cast<int64_t>(held_.size());
    const int64_t cached =
        options_.prefix_cache ? cache_.CachedPrefixTokens(prompt, r.prompt_size() - 1) : 0;
    const int64_t blocks = cache_.BlocksFor(static_cast<int64_t>(r.prompt_tokens()) + extra) -
                           cache_.BlocksFor(cached);
    if (cache_.blocks_free() < blocks + headroom) {
      m.reply(absl::ResourceExhaustedError(absl::StrCat(
          "latent cache full: ", r.prompt_tokens(), " + ", extra, " tokens need ", blocks,
          " blocks and ", headroom, " stay free for the ", held_.size(),
          " sequences here; ", cache_.blocks_free(), " free")));
      PublishLoad();
      return;
    }
  }
  absl::StatusOr<Reservation> reservation =
      options_.prefix_cache && r.prompt_size() > 0
          ? cache_.ReserveWithPrefix(prompt, r.prompt_tokens(), extra)
          : cache_.Reserve(r.prompt_tokens(), extra);
  if (!reservation.ok()) {
    m.reply(reservation.status());
    PublishLoad();
    return;
  }
  const absl::Duration timeout = r.timeout_ms() > 0 ? absl::Milliseconds(r.timeout_ms())
                                                    : options_.default_reservation_timeout;
  v1::ReserveResponse response;
  v1::LatentDestination* d = response.mutable_destination();
  const PagedLatentLayout& layout = cache_.layout();
  d->set_ucx_worker_address(options_.ucx_worker_address);
  d->set_rkey(options_.rkey);
  d->set_remote_base(options_.remote_base);
  d->set_region_bytes(options_.region_bytes);
  d->set_block_tokens(static_cast<int32_t>(layout.block_tokens));
  d->set_latent_dim(static_cast<int32_t>(layout.latent_dim));
  d->set_dtype_bytes(static_cast<int32_t>(layout.value_bytes()));
  d->set_layers(static_cast<int32_t>(layout.num_layers));
  d->set_reservation_id(reservation->id);
  d->set_generation(Fence(*reservation));
  d->set_timeout_ms(static_cast<int32_t>(absl::ToInt64Milliseconds(timeout)));
  d->set_transfer_mode(options_.transfer_mode);
  d->set_mtp_layer(options_.draft_tokens > 0);
  d->set_cached_tokens(static_cast<int32_t>(reservation->cached_tokens));
  for (BlockId b : reservation->blocks) d->add_blocks(b);

  Held held;
  held.request_id = r.request_id();
  held.arrival_us = r.arrival_us() > 0 ? r.arrival_us() : absl::ToUnixMicros(absl::Now());
  held.reclaim = ctx.ScheduleAfter(timeout + options_.reclaim_grace,
                                   ReclaimReservation{reservation->id});
  held.reservation = std::move(*reservation);
  max_issued_ = std::max(max_issued_, held.reservation.id);
  by_request_[held.request_id] = held.reservation.id;
  held_.emplace(held.reservation.id, std::move(held));
  PublishLoad();
  m.reply(std::move(response));
}

void DecodeActor::Handle(WritersGone m, runtime::Context<Message>& ctx) {
  int32_t freed = 0;
  for (const std::string& writer : m.request.writer_ids()) {
    if (writer.empty()) continue;
    // Remembered (bounded), so a Release naming the writer that arrives after this is freed too.
    if (gone_writers_.insert(writer).second) gone_order_.push_back(writer);
    while (gone_order_.size() > kMaxGoneWriters) {
      gone_writers_.erase(gone_order_.front());
      gone_order_.pop_front();
    }
  }
  std::vector<uint64_t> ids;
  for (const auto& [id, held] : held_) {
    if (held.state == State::kQuarantined && !held.writer.empty() &&
        gone_writers_.count(held.writer)) {
      ids.push_back(id);
    }
  }
  for (uint64_t id : ids) {
    Free(id, ctx);
    ++freed;
  }
  if (freed > 0) {
    SPLITMOE_LOG(INFO, "decode").With("reservations", freed)
        << "quarantined reservations of dead writers freed";
  }
  PublishLoad();
  v1::WritersGoneResponse response;
  response.set_reservations_freed(freed);
  m.reply(std::move(response));
}

void DecodeActor::Handle(ReleaseReservation m, runtime::Context<Message>& ctx) {
  const uint64_t id = m.request.reservation_id();
  auto it = held_.find(id);
  if (it == held_.end()) {
    // Idempotent for reservations this worker granted and already freed.
    if (id == 0 || id > max_issued_) {
      m.reply(absl::InvalidArgumentError(absl::StrCat("release: unknown reservation ", id)));
    } else {
      m.reply(absl::OkStatus());
    }
    return;
  }
  Held& held = it->second;
  if (!m.request.request_id().empty() &&
      (m.request.request_id() != held.request_id ||
       m.request.generation() != Fence(held.reservation))) {
    m.reply(absl::FailedPreconditionError(absl::StrCat(
        "release: reservation ", id, " belongs to request ", held.request_id, " generation ",
        Fence(held.reservation), ", not ", m.request.request_id(), " generation ",
        m.request.generation(), "; nothing released")));
    return;
  }
  switch (held.state) {
    case State::kRunning:
      StopRunning(id, "cancelled", ctx);
      break;
    case State::kReserved:
    case State::kQuarantined:
      if (m.request.writer_done()) {
        Free(id, ctx);
      } else {
        held.state = State::kQuarantined;  // no Start from now on; blocks wait for the writer
        held.release_reason = m.request.reason();
        if (!m.request.writer_id().empty()) held.writer = m.request.writer_id();
        if (!held.writer.empty() && gone_writers_.count(held.writer)) Free(id, ctx);
      }
      break;
  }
  PublishLoad();
  m.reply(absl::OkStatus());
}

void DecodeActor::Handle(StartSequence m, runtime::Context<Message>& ctx) {
  const v1::StartRequest& r = m.request;
  const uint64_t id = r.reservation_id();
  auto it = held_.find(id);
  if (it == held_.end()) {
    m.reply(id == 0 || id > max_issued_
                ? absl::InvalidArgumentError(absl::StrCat("start: unknown reservation ", id))
                : absl::FailedPreconditionError(
                      absl::StrCat("start: reservation ", id, " was already released")));
    return;
  }
  Held& held = it->second;
  // A Start that is not from this reservation's writer (another request, an old generation)
  // must not touch it: refused, and the blocks stay with their owner.
  if (r.request_id() != held.request_id || r.generation() != Fence(held.reservation)) {
    m.reply(absl::FailedPreconditionError(absl::StrCat(
        "start: reservation ", id, " belongs to request ", held.request_id, " generation ",
        Fence(held.reservation), ", not ", r.request_id(), " generation ", r.generation())));
    return;
  }
  if (held.state != State::kReserved) {
    // The writer flushed before sending Start, so nothing of it can land any more: free now.
    const bool running = held.state == State::kRunning;
    const std::string reason = held.release_reason;
    if (!running) Free(id, ctx);
    PublishLoad();
    m.reply(absl::FailedPreconditionError(
        running ? absl::StrCat("start: reservation ", id, " is already running")
                : absl::StrCat("start: reservation ", id, " was released (", reason, ")")));
    return;
  }
  absl::Status fence = cache_.Validate(held.reservation);
  if (!fence.ok()) {
    m.reply(fence);
    return;
  }
  if (fence.ok() && r.prompt_size() != held.reservation.tokens) {
    fence = absl::InvalidArgumentError(absl::StrCat("start: ", r.prompt_size(),
                                                    " prompt tokens, the reservation holds ",
                                                    held.reservation.tokens));
  }
  const v1::SamplingParamsInternal& s = r.sampling();
  engine::DecodeSequence seq;
  seq.id = r.request_id();
  seq.prompt_tokens = r.prompt_size();
  seq.next_token = r.first_token();
  seq.generated = 1;
  seq.sampling = {.temperature = s.temperature(),
                  .top_p = s.top_p() == 0 ? 1.0 : s.top_p(),
                  .top_k = s.top_k(),
                  .seed = s.seed()};
  seq.max_tokens = s.max_tokens();
  seq.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  seq.ignore_eos = s.ignore_eos();
  seq.logprobs = s.logprobs() > 0 ? s.logprobs() : -1;
  if (fence.ok()) fence = engine::ValidateSamplingParams(seq.sampling);
  // The sequence's views of the cache: the host arena's, or its device copy's (whose first
  // step copies the prompt rows the writer put, past the shared prefix, to the device).
  DeviceArena* arena = options_.device_arena;
  const std::shared_ptr<PendingUpload> upload =
      arena != nullptr ? DeviceArena::UploadFrom(held.reservation.cached_tokens, seq.prompt_tokens)
                       : nullptr;
  auto view = [&](int64_t stored, int64_t layer_offset) -> std::unique_ptr<engine::SequenceCache> {
    if (arena != nullptr) return arena->View(&cache_, id, stored, layer_offset, upload);
    return std::make_unique<PagedSequenceCache>(&cache_, id, stored, layer_offset);
  };
  if (fence.ok()) {
    seq.cache = view(seq.prompt_tokens, 0);
    const model::ModelConfig& c = transformer_->config();
    // The writer filled the MTP module's layer (every prompt row but the last) and sent the
    // last hidden state: this sequence speculates. Otherwise it decodes one token a step.
    if (options_.draft_tokens > 0 && r.mtp_hidden_size() > 0) {
      if (r.mtp_hidden_size() != c.hidden_size) {
        fence = absl::InvalidArgumentError(absl::StrCat(
            "start: ", r.mtp_hidden_size(), " MTP hidden values, the model's hidden size is ",
            c.hidden_size));
      } else {
        seq.mtp_cache = view(seq.prompt_tokens - 1, /*layer_offset=*/c.num_hidden_layers);
        seq.mtp_tokens = {seq.next_token};
        seq.mtp_hidden.assign(r.mtp_hidden().begin(), r.mtp_hidden().end());
      }
    }
    if (fence.ok()) fence = engine::BatchDecoder::Check(seq);
  }
  if (fence.ok()) {
    held.upload = upload;
    joining_.push_back(std::move(seq));  // joins at the next step
  }
  if (!fence.ok()) {
    Free(id, ctx);  // the writer is done (it sent Start after its flush)
    PublishLoad();
    m.reply(fence);
    return;
  }
  ctx.CancelTimer(held.reclaim);
  held.reclaim = runtime::TimerId();
  held.state = State::kRunning;
  held.tokens.assign(r.prompt().begin(), r.prompt().end());
  held.tokens.push_back(r.first_token());
  // What the writer put: the prompt's rows past the cached prefix (shared in place).
  const uint64_t written =
      static_cast<uint64_t>(r.prompt_size() - held.reservation.cached_tokens);
  latent_tokens_ += written;
  latent_bytes_ += written * cache_.layout().num_layers * cache_.layout().row_bytes();
  ScheduleStep(ctx);
  PublishLoad();
  m.reply(absl::OkStatus());
}

void DecodeActor::Handle(CancelSequence m, runtime::Context<Message>& ctx) {
  auto it = by_request_.find(m.request_id);
  if (it == by_request_.end()) {
    m.reply(absl::InvalidArgumentError(absl::StrCat("cancel: unknown request ", m.request_id)));
    return;
  }
  const uint64_t id = it->second;
  Held& held = held_.at(id);
  if (held.state == State::kRunning) {
    StopRunning(id, "cancelled", ctx);
  } else {
    held.state = State::kQuarantined;
    held.release_reason = "cancelled";
  }
  PublishLoad();
  m.reply(absl::OkStatus());
}

void DecodeActor::Handle(AddTokenSink m) { sinks_.push_back(std::move(m)); }

void DecodeActor::Handle(RunStep, runtime::Context<Message>& ctx) {
  step_scheduled_ = false;
  if (stepping_) return;  // StepDone schedules the next one
  std::vector<engine::DecodeSequence> joining;
  joining.swap(joining_);
  for (engine::DecodeSequence& seq : joining) {
    const std::string id = seq.id;
    absl::Status added = decoder_.Add(std::move(seq));
    if (!added.ok()) {  // checked at Start: not expected
      auto it = by_request_.find(id);
      if (it != by_request_.end()) StopNow(it->second, absl::StrCat("error: ", added.message()), ctx);
    }
  }
  MakeRoom(ctx);
  PublishLoad();
  if (decoder_.running() == 0) return;
  max_running_ = std::max(max_running_, static_cast<int32_t>(decoder_.running()));
  stepping_ = true;
  // The decoder and its sequences' caches belong to the step until StepDone.
  executor_->Run([this, self = ctx.self()] {
    absl::StatusOr<std::vector<engine::DecodedToken>> tokens = decoder_.Step();
    // On a device: no copy into the host arena outlives the step (its blocks may be freed and
    // written by a prefill worker once the actor hears the step is done).
    if (options_.device_arena != nullptr) {
      absl::Status synced = kernels::Synchronize(options_.device_arena->device());
      if (!synced.ok() && tokens.ok()) tokens = synced;
    }
    self.Send(StepDone{std::move(tokens)});
  });
}

void DecodeActor::Handle(StepDone m, runtime::Context<Message>& ctx) {
  stepping_ = false;
  speculative_ = decoder_.speculative_stats();  // the step is over: the decoder is ours again
  std::map<uint64_t, std::string> stopping;
  stopping.swap(stopping_);
  absl::StatusOr<std::vector<engine::DecodedToken>>& step = m.tokens;
  if (!step.ok()) {
    SPLITMOE_LOG(ERROR, "decode") << "step failed: " << step.status();
    // Every sequence of the step fails; those that joined meanwhile go on.
    std::set<std::string> joined;
    for (const engine::DecodeSequence& seq : joining_) joined.insert(seq.id);
    for (auto& [id, held] : held_) {
      if (held.state == State::kRunning && !joined.count(held.request_id) && !stopping.count(id))
        stopping.emplace(id, absl::StrCat("error: ", step.status().message()));
      // On a device, the step's copies may not have landed: publish none of its sequences.
      if (options_.device_arena != nullptr && !joined.count(held.request_id)) {
        held.device_rows_sure = false;
      }
    }
    for (const auto& [id, reason] : stopping) StopNow(id, reason, ctx);
    ScheduleStep(ctx);
    PublishLoad();
    return;
  }
  std::set<std::string> stopped;
  for (const auto& [id, reason] : stopping) {
    auto it = held_.find(id);
    if (it != held_.end()) stopped.insert(it->second.request_id);
  }
  for (engine::DecodedToken& t : *step) {
    if (stopped.count(t.id)) continue;  // stopped during the step: its token is not sent
    ++tokens_generated_;
    if (auto r = by_request_.find(t.id); r != by_request_.end()) {
      held_.at(r->second).tokens.push_back(t.token);
    }
    v1::TokenEvent event;
    event.set_request_id(t.id);
    event.set_token(t.token);
    if (t.logprob) *event.mutable_logprob() = rpc::ToProto(*t.logprob);
    event.set_finished(t.finished);
    event.set_finish_reason(t.finish_reason);
    Emit(std::move(event));
  }
  for (engine::DecodeSequence& done : decoder_.TakeFinished()) {
    auto it = by_request_.find(done.id);
    const int64_t rows = RowsInEveryLayer(done);
    done.cache.reset();  // the views go before their blocks
    done.mtp_cache.reset();
    if (it == by_request_.end()) continue;
    const uint64_t id = it->second;
    auto stop = stopping.find(id);
    if (stop != stopping.end()) {
      StopNow(id, stop->second, ctx);  // finished and stopped in the same step: the stop wins
      stopping.erase(stop);
    } else {
      FreeRunning(id, rows, ctx);
    }
  }
  for (const auto& [id, reason] : stopping) StopNow(id, reason, ctx);
  ScheduleStep(ctx);
  PublishLoad();
}

void DecodeActor::Handle(ReclaimReservation m, runtime::Context<Message>& ctx) {
  auto it = held_.find(m.reservation_id);
  if (it == held_.end() || it->second.state == State::kRunning) return;
  it->second.reclaim = runtime::TimerId();  // this timer has fired
  SPLITMOE_LOG(WARNING, "decode").With("reservation", m.reservation_id)
          .With("request", it->second.request_id)
      << "reservation never started or confirmed by its writer: reclaiming its blocks";
  Free(m.reservation_id, ctx);
  PublishLoad();
}

void DecodeActor::MakeRoom(runtime::Context<Message>& ctx) {
  struct Need {
    uint64_t id;
    int64_t arrival_us;
    int64_t tokens;
  };
  std::vector<Need> needs;
  for (const auto& [request_id, tokens] : decoder_.NextStepTokens()) {
    auto it = by_request_.find(request_id);
    if (it == by_request_.end()) continue;
    needs.push_back({it->second, held_.at(it->second).arrival_us, tokens});
  }
  // Oldest first; the victims are taken from the back.
  std::sort(needs.begin(), needs.end(), [](const Need& a, const Need& b) {
    return a.arrival_us != b.arrival_us ? a.arrival_us < b.arrival_us : a.id < b.id;
  });
  size_t end = needs.size();
  for (size_t i = 0; i < end; ++i) {
    for (absl::Status grown = cache_.Grow(needs[i].id, needs[i].tokens); !grown.ok();
         grown = cache_.Grow(needs[i].id, needs[i].tokens)) {
      if (grown.code() != absl::StatusCode::kResourceExhausted) {  // not expected: this one ends
        StopNow(needs[i].id, absl::StrCat("error: ", grown.message()), ctx);
        break;
      }
      // No block left: the sequence that arrived last gives its blocks back (perhaps this one).
      const uint64_t victim = needs[--end].id;
      if (auto v = held_.find(victim); v != held_.end()) {
        ++preemptions_;
        SPLITMOE_LOG(INFO, "decode").With("request", v->second.request_id)
                .With("blocks_free", cache_.blocks_free())
            << "cache full: sequence preempted (its router prefills it again)";
        StopNow(victim, "preempted", ctx);
      }
      if (victim == needs[i].id) break;
    }
  }
}

void DecodeActor::FreeRunning(uint64_t id, int64_t rows, runtime::Context<Message>& ctx) {
  auto it = held_.find(id);
  if (it == held_.end()) return;
  // On a device, a sequence stopped before its first step never copied its prompt there (and
  // one whose step failed there may not have): its blocks' device rows may not be its rows, so
  // none is published.
  const bool rows_on_device =
      it->second.upload == nullptr || (it->second.upload->done && it->second.device_rows_sure);
  if (options_.prefix_cache && rows > 0 && rows_on_device) {
    const std::vector<int32_t>& tokens = it->second.tokens;
    (void)cache_.Publish(id, absl::MakeConstSpan(tokens).subspan(
                                 0, std::min(tokens.size(), static_cast<size_t>(rows))));
  }
  Free(id, ctx);
}

void DecodeActor::Free(uint64_t id, runtime::Context<Message>& ctx) {
  auto it = held_.find(id);
  if (it == held_.end()) return;
  if (it->second.reclaim.valid()) ctx.CancelTimer(it->second.reclaim);
  (void)cache_.Release(id);
  by_request_.erase(it->second.request_id);
  held_.erase(it);
}

void DecodeActor::StopRunning(uint64_t id, const std::string& reason,
                              runtime::Context<Message>& ctx) {
  auto it = held_.find(id);
  if (it == held_.end()) return;
  const std::string& request_id = it->second.request_id;
  const bool joining = std::any_of(joining_.begin(), joining_.end(),
                                   [&](const engine::DecodeSequence& s) { return s.id == request_id; });
  if (stepping_ && !joining) {
    stopping_.emplace(id, reason);  // the step still uses its blocks
    return;
  }
  StopNow(id, reason, ctx);
}

void DecodeActor::StopNow(uint64_t id, const std::string& reason, runtime::Context<Message>& ctx) {
  auto it = held_.find(id);
  if (it == held_.end()) return;
  const std::string request_id = it->second.request_id;
  {
    auto j = std::find_if(joining_.begin(), joining_.end(),
                          [&](const engine::DecodeSequence& s) { return s.id == request_id; });
    int64_t rows = -1;  // rows its cache holds, when it ran
    if (j != joining_.end()) {
      joining_.erase(j);  // its cache view goes here, before its blocks
    } else {
      absl::StatusOr<engine::DecodeSequence> seq = decoder_.Remove(request_id);
      if (seq.ok()) rows = RowsInEveryLayer(*seq);
      // `seq` (its cache views) is destroyed here, before its blocks are freed.
    }
    if (rows >= 0) {
      FreeRunning(id, rows, ctx);  // a preempted sequence's own prefix is found when it returns
    } else {
      Free(id, ctx);
    }
  }
  v1::TokenEvent event;
  event.set_request_id(request_id);
  event.set_finished(true);
  event.set_finish_reason(reason);
  event.set_token(-1);
  Emit(std::move(event));
}

void DecodeActor::Emit(v1::TokenEvent event) {
  const std::string owner = RequestOwner(event.request_id());
  for (auto it = sinks_.begin(); it != sinks_.end();) {
    if (it->router_id != owner) {
      ++it;
      continue;
    }
    it = it->write(event) ? it + 1 : sinks_.erase(it);
  }
}

void DecodeActor::ScheduleStep(runtime::Context<Message>& ctx) {
  if (step_scheduled_ || stepping_ || (decoder_.running() == 0 && joining_.empty())) return;
  step_scheduled_ = ctx.self().Send(RunStep{});
}

void DecodeActor::PublishLoad() {
  v1::WorkerLoad load;
  load.set_requests_in_flight(static_cast<int32_t>(held_.size()));
  load.set_cache_blocks_used(static_cast<int32_t>(cache_.blocks_used()));
  load.set_cache_blocks_free(static_cast<int32_t>(cache_.blocks_free()));
  int32_t quarantined = 0, running = 0;
  for (const auto& [id, held] : held_) {
    if (held.state == State::kQuarantined)
      quarantined += static_cast<int32_t>(held.reservation.blocks.size());
    if (held.state == State::kRunning) ++running;
  }
  load.set_cache_blocks_quarantined(quarantined);
  load.set_latent_bytes_received(latent_bytes_);
  load.set_latent_tokens(latent_tokens_);
  load.set_tokens_processed(tokens_generated_);
  load.set_sequences_running(running);  // the decoder is the step's while one runs
  if (overlap_ != nullptr) load.set_micro_batch_overlaps(overlap_->handoffs());
  load.set_draft_tokens_proposed(static_cast<uint64_t>(speculative_.drafted));
  load.set_draft_tokens_accepted(static_cast<uint64_t>(speculative_.accepted));
  load.set_verify_passes(static_cast<uint64_t>(speculative_.verify_passes));
  load.set_preemptions(preemptions_);
  load.set_prefix_tokens_queried(static_cast<uint64_t>(cache_.prefix_tokens_queried()));
  load.set_prefix_tokens_hit(static_cast<uint64_t>(cache_.prefix_tokens_hit()));
  load.set_cache_blocks_cached(static_cast<int32_t>(cache_.blocks_cached()));
  load.set_cache_blocks_evicted(static_cast<uint64_t>(cache_.blocks_evicted()));
  load.set_max_sequences_running(max_running_);
  gauge_->Set(std::move(load));
}

// ---- gRPC face ----

grpc::ServerUnaryReactor* DecodeService::Reserve(grpc::CallbackServerContext* ctx,
                                                 const v1::ReserveRequest* request,
                                                 v1::ReserveResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  actor_.Send(ReserveBlocks{*request, [reactor, response](absl::StatusOr<v1::ReserveResponse> r) {
                              if (r.ok()) *response = std::move(*r);
                              reactor->Finish(rpc::ToGrpcStatus(r.status()));
                            }});
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::Release(grpc::CallbackServerContext* ctx,
                                                 const v1::ReleaseRequest* request,
                                                 v1::ReleaseResponse* /*response*/) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  actor_.Send(ReleaseReservation{
      *request, [reactor](absl::Status s) { reactor->Finish(rpc::ToGrpcStatus(s)); }});
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::Start(grpc::CallbackServerContext* ctx,
                                               const v1::StartRequest* request,
                                               v1::StartResponse* /*response*/) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  actor_.Send(StartSequence{*request,
                            [reactor](absl::Status s) { reactor->Finish(rpc::ToGrpcStatus(s)); }});
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::Cancel(grpc::CallbackServerContext* ctx,
                                                const v1::CancelRequest* request,
                                                v1::CancelResponse* /*response*/) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (RequestOwner(request->request_id()) != request->router_id()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                                 absl::StrCat("cancel: request ", request->request_id(),
                                              " is not router '", request->router_id(), "''s")));
    return reactor;
  }
  actor_.Send(CancelSequence{request->request_id(),
                             [reactor](absl::Status s) { reactor->Finish(rpc::ToGrpcStatus(s)); }});
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::WritersGone(grpc::CallbackServerContext* ctx,
                                                     const v1::WritersGoneRequest* request,
                                                     v1::WritersGoneResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  actor_.Send(decode::WritersGone{
      *request, [reactor, response](absl::StatusOr<v1::WritersGoneResponse> r) {
        if (r.ok()) *response = std::move(*r);
        reactor->Finish(rpc::ToGrpcStatus(r.status()));
      }});
  return reactor;
}

grpc::ServerWriteReactor<v1::TokenEvent>* DecodeService::StreamTokens(
    grpc::CallbackServerContext* ctx, const v1::StreamTokensRequest* request) {
  if (grpc::Status s = rpc::CheckInternalCaller(ctx); !s.ok()) {
    return rpc::RefusedWriter<v1::TokenEvent>(std::move(s));
  }
  auto [reactor, stream] = rpc::ServerStream<v1::TokenEvent>::Create(nullptr);
  auto write = [stream = stream](const v1::TokenEvent& e) { return stream->Write(e); };
  if (!actor_.Send(AddTokenSink{write, request->router_id()})) {
    stream->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "decode worker is stopping"));
  }
  return reactor;
}

}  // namespace splitmoe::decode
