#include "prefill/prefill_worker.h"

#include <condition_variable>
#include <cstring>
#include <iostream>
#include <mutex>

#include "common/base/log.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/engine/batch_decoder.h"
#include "common/model/numeric.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "prefill/latent_shipper.h"

namespace splitmoe::prefill {
namespace {


// The remote layout named by a destination, checked against this worker's model.
absl::StatusOr<decode::PagedLatentLayout> LayoutOf(const v1::LatentDestination& d,
                                                   const model::ModelConfig& c) {
  const int64_t layers = c.num_hidden_layers + (d.mtp_layer() ? 1 : 0);
  if (d.layers() != layers || d.latent_dim() != c.latent_dim()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "destination cache has ", d.layers(), " layers x ", d.latent_dim(), " values",
        d.mtp_layer() ? " (the MTP module's included)" : "", ", this model ", layers, " x ",
        c.latent_dim()));
  }
  if (d.dtype_bytes() != 4 && d.dtype_bytes() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("destination dtype of ", d.dtype_bytes(), " bytes (want 4 or 2)"));
  }
  decode::PagedLatentLayout layout{
      .num_layers = d.layers(),
      .latent_dim = d.latent_dim(),
      .block_tokens = d.block_tokens(),
      .dtype = d.dtype_bytes() == 4 ? decode::LatentDType::kFloat32
                                    : decode::LatentDType::kBFloat16};
  SPLITMOE_RETURN_IF_ERROR(layout.Validate());
  return layout;
}

// A prompt's identity across RunPrefill and CancelPrefill: its request id and, with a
// destination, the reservation and generation (a failover reuses the request id).
template <typename Request>  // v1::PrefillRequest or v1::CancelPrefillRequest
std::string PromptKey(const Request& r) {
  if (!r.has_destination()) return r.request_id();
  return absl::StrCat(r.request_id(), "/", r.destination().reservation_id(), "/",
                      r.destination().generation());
}

}  // namespace

// One prompt of a batch: its request, its local cache and shipper, and its outcome.
struct PrefillActor::Job {
  RunPrompt message;
  std::vector<int32_t> prompt;
  engine::SamplingParams sampling;
  std::unique_ptr<engine::SequenceCache> local;
  std::unique_ptr<engine::SequenceCache> local_mtp;  // the destination wants the MTP layer
  std::vector<float> last_hidden;                  // for the MTP module's first draft
  int64_t cached = 0;  // prompt rows already in the destination (prefix cache), read back
  std::unique_ptr<LatentShipper> shipper;
  absl::Time deadline = absl::InfiniteFuture();
  absl::Status status;
  engine::DecodedToken first;
  std::vector<std::optional<engine::TokenLogprob>> prompt_logprobs;

  bool ship() const { return message.request.has_destination(); }
  const v1::LatentDestination& destination() const { return message.request.destination(); }
  bool cancelled() const {
    return (message.cancel_requested != nullptr && message.cancel_requested->load()) ||
           (message.cancelled && message.cancelled());
  }
};

PrefillActor::PrefillActor(engine::Transformer* transformer, transfer::UcxTransport* transport,
                           std::shared_ptr<decode::LoadGauge> gauge, engine::AttentionForm form,
                           int64_t batch_tokens, int micro_batches,
                           std::unique_ptr<runtime::Executor> executor, CacheFactory new_cache)
    : transformer_(transformer),
      new_cache_(std::move(new_cache)),
      transport_(transport),
      gauge_(std::move(gauge)),
      form_(form),
      batch_tokens_(batch_tokens),
      overlap_(micro_batches >= 2 ? std::make_unique<engine::PingPong>() : nullptr),
      executor_(std::move(executor)) {}

PrefillActor::~PrefillActor() = default;

absl::StatusOr<std::unique_ptr<engine::SequenceCache>> PrefillActor::NewCache(bool mtp) {
  if (new_cache_) return new_cache_(mtp);
  const model::ModelConfig& c = transformer_->config();
  return std::unique_ptr<engine::SequenceCache>(
      std::make_unique<engine::LatentCache>(mtp ? 1 : c.num_hidden_layers, c.latent_dim()));
}

void PrefillActor::Handle(RunPrompt m, runtime::Context<Message>& ctx) {
  const std::string key = PromptKey(m.request);
  if (cancelled_unseen_.erase(key) > 0) {
    // Its reservation was released as the writer when the cancel came.
    m.reply(absl::CancelledError("prefill cancelled before it arrived"));
    return;
  }
  m.cancel_requested = std::make_shared<std::atomic<bool>>(false);
  live_[key] = m.cancel_requested;
  pending_.push_back(std::move(m));
  if (!batch_scheduled_ && !computing_) batch_scheduled_ = ctx.self().Send(RunBatch{});
}

void PrefillActor::Handle(RunBatch, runtime::Context<Message>& ctx) {
  batch_scheduled_ = false;
  if (computing_ || pending_.empty()) return;  // BatchDone starts the next one
  // Prompts that arrived while the previous batch ran go together, up to the token budget.
  int64_t tokens = 0;
  while (!pending_.empty()) {
    const int64_t n = pending_.front().request.prompt_size();
    if (!batch_.empty() && tokens + n > batch_tokens_) break;
    batch_.push_back(std::unique_ptr<Job>(new Job{std::move(pending_.front())}));
    pending_.pop_front();
    tokens += n;
  }
  computing_ = true;
  executor_->Run([this, self = ctx.self()] { self.Send(RunJobs()); });
}

BatchDone PrefillActor::RunJobs() {
  for (auto& job : batch_) job->status = Prepare(*job);
  Compute(batch_);
  BatchDone done;
  for (auto& job : batch_) {
    uint64_t bytes_put = 0;
    done.results.push_back(Conclude(*job, &bytes_put));
    done.latent_bytes += bytes_put;
    if (done.results.back().ok() && job->ship() && done.results.back()->finish_reason().empty()) {
      done.latent_tokens += static_cast<uint64_t>(job->prompt.size() - job->cached);
    }
  }
  return done;
}

void PrefillActor::Handle(BatchDone m, runtime::Context<Message>& ctx) {
  computing_ = false;
  std::vector<std::unique_ptr<Job>> jobs;
  jobs.swap(batch_);
  latent_bytes_sent_ += m.latent_bytes;
  latent_tokens_ += m.latent_tokens;
  prompts_ += jobs.size();
  ++batches_;
  PublishLoad();  // before the replies: a caller that sees its reply sees these counters too
  for (size_t i = 0; i < jobs.size(); ++i) {
    live_.erase(PromptKey(jobs[i]->message.request));
    jobs[i]->message.reply(std::move(m.results[i]));
  }
  if (!pending_.empty() && !batch_scheduled_) batch_scheduled_ = ctx.self().Send(RunBatch{});
}

void PrefillActor::Handle(CancelPrompt m, runtime::Context<Message>& ctx) {
  const std::string key = PromptKey(m.request);
  v1::CancelPrefillResponse response;
  auto it = live_.find(key);
  if (it != live_.end()) {
    it->second->store(true);  // it stops at its next layer and releases as the writer
    response.set_seen(true);
    m.reply(std::move(response));
    return;
  }
  // Not seen (or already answered, whose release this repeats: releases are idempotent).
  const absl::Time now = absl::Now();
  while (!cancelled_order_.empty() &&
         (cancelled_order_.front().first < now - kCancelledPromptMemory ||
          cancelled_order_.size() >= kMaxCancelledPrompts)) {
    auto old = cancelled_unseen_.find(cancelled_order_.front().second);
    if (old != cancelled_unseen_.end() && old->second == cancelled_order_.front().first) {
      cancelled_unseen_.erase(old);
    }
    cancelled_order_.pop_front();
  }
  cancelled_unseen_[key] = now;
  cancelled_order_.emplace_back(now, key);
  if (m.request.has_destination()) {
    // A blocking call to the decode worker: on the executor (which owns the stubs), after the
    // batch it may be running.
    executor_->Run([this, destination = m.request.destination(), id = m.request.request_id()] {
      ReleaseAsWriter(destination, id, "prefill cancelled before it reached the prefill worker");
    });
  }
  m.reply(std::move(response));
}

absl::Status PrefillActor::ReadCachedPrefix(Job& job, const decode::PagedLatentLayout& layout,
                                            transfer::PeerId peer,
                                            const transfer::RegionDescriptor& remote) {
  const v1::LatentDestination& d = job.destination();
  const model::ModelConfig& c = transformer_->config();
  const int64_t cached = d.cached_tokens(), t = layout.block_tokens;
  if (cached < 0 || cached % t != 0 || cached >= static_cast<int64_t>(job.prompt.size()) ||
      cached / t > d.blocks_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "destination says ", cached, " prompt tokens are cached: not a whole number of ", t,
        "-token blocks below the prompt's ", job.prompt.size(), " within its ", d.blocks_size(),
        " blocks"));
  }
  // A block is contiguous across layers: one get per block.
  const int64_t blocks = cached / t, block_bytes = layout.block_bytes();
  std::vector<uint8_t> staged(static_cast<size_t>(blocks * block_bytes));
  std::mutex mu;
  std::condition_variable cv;
  int64_t left = blocks;
  absl::Status first;
  for (int64_t b = 0; b < blocks; ++b) {
    transport_->Get(peer, staged.data() + b * block_bytes, static_cast<size_t>(block_bytes),
                    remote, static_cast<uint64_t>(layout.LayerSlabOffset(d.blocks(b), 0)),
                    [&](absl::Status s) {
                      std::lock_guard<std::mutex> lock(mu);
                      if (!s.ok() && first.ok()) first = s;
                      if (--left == 0) cv.notify_all();
                    });
  }
  {
    // Every get ends (done, failed, past the transport's operation timeout, or shut down).
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return left == 0; });
  }
  SPLITMOE_RETURN_IF_ERROR(Annotate(first, "reading the cached prefix from the decode worker"));
  // Each layer's rows as fp32, written into the local cache (wherever it keeps them).
  std::vector<float> rows(static_cast<size_t>(cached * layout.latent_dim));
  auto widen = [&](int64_t layer, engine::SequenceCache& into, int64_t into_layer) {
    for (int64_t p = 0; p < cached; ++p) {
      const uint8_t* row = staged.data() + (p / t) * block_bytes + layer * layout.layer_slab_bytes() +
                           (p % t) * layout.row_bytes();
      float* out = rows.data() + p * layout.latent_dim;
      if (layout.dtype == decode::LatentDType::kFloat32) {
        std::memcpy(out, row, static_cast<size_t>(layout.row_bytes()));
      } else {
        for (int64_t v = 0; v < layout.latent_dim; ++v) {
          uint16_t bits;
          std::memcpy(&bits, row + 2 * v, 2);
          out[v] = model::Bf16ToFloat(bits);
        }
      }
    }
    return into.WriteRows(into_layer, 0, rows.data(), cached);
  };
  SPLITMOE_RETURN_IF_ERROR(job.local->Reserve(cached));
  if (job.local_mtp != nullptr) SPLITMOE_RETURN_IF_ERROR(job.local_mtp->Reserve(cached));
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    SPLITMOE_RETURN_IF_ERROR(widen(layer, *job.local, layer));
  }
  if (job.local_mtp != nullptr) {
    SPLITMOE_RETURN_IF_ERROR(widen(c.num_hidden_layers, *job.local_mtp, 0));
    job.local_mtp->Commit(cached);
  }
  job.local->Commit(cached);
  job.cached = cached;
  return absl::OkStatus();
}

absl::Status PrefillActor::Prepare(Job& job) {
  const v1::PrefillRequest& req = job.message.request;
  const model::ModelConfig& c = transformer_->config();
  if (job.cancelled()) return absl::CancelledError("prefill cancelled before it started");
  const v1::SamplingParamsInternal& s = req.sampling();
  job.sampling = {.temperature = s.temperature(),
                  .top_p = s.top_p() == 0 ? 1.0 : s.top_p(),
                  .top_k = s.top_k(),
                  .seed = s.seed()};
  SPLITMOE_RETURN_IF_ERROR(engine::ValidateSamplingParams(job.sampling));
  if (req.prompt().empty()) return absl::InvalidArgumentError("empty prompt");
  job.prompt.assign(req.prompt().begin(), req.prompt().end());
  SPLITMOE_ASSIGN_OR_RETURN(job.local, NewCache(/*mtp=*/false));
  if (!job.ship()) return absl::OkStatus();
  if (transport_ == nullptr) return absl::FailedPreconditionError("this worker ships no latents");
  const v1::LatentDestination& d = job.destination();
  SPLITMOE_ASSIGN_OR_RETURN(decode::PagedLatentLayout layout, LayoutOf(d, c));
  if (d.blocks_size() * layout.block_tokens < req.prompt_size()) {
    return absl::InvalidArgumentError(absl::StrCat(d.blocks_size(), " reserved blocks of ",
                                                   layout.block_tokens, " tokens cannot hold ",
                                                   req.prompt_size(), " prompt tokens"));
  }
  SPLITMOE_ASSIGN_OR_RETURN(transfer::PeerId peer, transport_->Connect(d.ucx_worker_address()));
  transfer::RegionDescriptor remote{.worker_address = d.ucx_worker_address(),
                                    .remote_addr = d.remote_base(),
                                    .size_bytes = d.region_bytes(),
                                    .rkey = d.rkey()};
  job.shipper = std::make_unique<LatentShipper>(
      transport_, peer, remote, layout,
      std::vector<decode::BlockId>(d.blocks().begin(), d.blocks().end()));
  if (d.timeout_ms() > 0) job.deadline = job.message.received + absl::Milliseconds(d.timeout_ms());
  // Without the module the main layers go alone: the decode worker decodes one token a step.
  if (d.mtp_layer() && transformer_->mtp_modules() > 0) {
    SPLITMOE_ASSIGN_OR_RETURN(job.local_mtp, NewCache(/*mtp=*/true));
  }
  if (d.cached_tokens() != 0) {
    SPLITMOE_RETURN_IF_ERROR(ReadCachedPrefix(job, layout, peer, remote));
  }
  return absl::OkStatus();
}

void PrefillActor::Compute(std::vector<std::unique_ptr<Job>>& jobs) {
  std::vector<engine::PrefillItem> items;
  std::vector<Job*> running;
  for (auto& job : jobs) {
    if (!job->status.ok()) continue;
    engine::PrefillItem item;
    // The cached prefix's rows are in the local caches already: only the rest is computed.
    item.prompt = absl::MakeConstSpan(job->prompt).subspan(static_cast<size_t>(job->cached));
    item.cache = job->local.get();
    item.mtp_cache = job->local_mtp.get();
    item.sampling = job->sampling;
    const v1::PrefillRequest& req = job->message.request;
    item.logprobs = req.sampling().logprobs() > 0 ? req.sampling().logprobs() : -1;
    item.prompt_top_logprobs = req.prompt_logprobs() > 0 ? req.prompt_logprobs() : -1;
    items.push_back(std::move(item));
    running.push_back(job.get());
  }
  if (items.empty()) return;
  // Latents go to each prompt's local cache (the transformer computes with it) and from there,
  // layer by layer, into its reserved remote blocks. A cancelled prompt, or one past its
  // transfer deadline, stops putting at once; the others go on.
  (void)engine::PrefillBatch(
      *transformer_, items, form_,
      [&](size_t i, int64_t layer, int64_t from, int64_t count) -> absl::Status {
        Job& job = *running[i];
        if (job.cancelled()) return absl::CancelledError("prefill cancelled");
        if (!job.ship()) return absl::OkStatus();
        if (absl::Now() > job.deadline) {
          return absl::DeadlineExceededError(absl::StrCat(
              "prefill passed its transfer deadline of ", job.destination().timeout_ms(), " ms"));
        }
        from += job.cached;  // positions in the item's prompt -> in the sequence
        if (layer == transformer_->config().num_hidden_layers) {  // the MTP module's rows
          return job.shipper->ShipLayer(*job.local_mtp, 0, from, count, layer);
        }
        return job.shipper->ShipLayer(*job.local, layer, from, count);
      },
      /*chunk_tokens=*/256, overlap_.get());
  for (size_t i = 0; i < items.size(); ++i) {
    running[i]->status = items[i].status;
    running[i]->first = std::move(items[i].first);
    running[i]->prompt_logprobs = std::move(items[i].prompt_logprobs);
    running[i]->last_hidden = std::move(items[i].last_hidden);
  }
}

absl::StatusOr<v1::PrefillResponse> PrefillActor::Conclude(Job& job, uint64_t* bytes_put) {
  const v1::PrefillRequest& req = job.message.request;
  const v1::LatentDestination& d = job.destination();
  absl::Status status = job.status;
  if (job.shipper != nullptr) {
    absl::Status flushed = job.shipper->Finish();  // every put has landed (or failed) after this
    *bytes_put = job.shipper->bytes_put();
    if (status.ok()) status = flushed;
  }
  if (!status.ok()) {
    if (job.ship()) ReleaseAsWriter(d, req.request_id(), std::string(status.message()));
    return status;
  }
  const v1::SamplingParamsInternal& s = req.sampling();
  v1::PrefillResponse response;
  response.set_first_token(job.first.token);
  if (job.first.logprob) *response.mutable_first_token_logprob() = rpc::ToProto(*job.first.logprob);
  for (const auto& lp : job.prompt_logprobs) {
    v1::PromptLogprob* entry = response.add_prompt_logprobs();
    if (lp) *entry->mutable_logprob() = rpc::ToProto(*lp);
  }
  response.set_latent_bytes_written(*bytes_put);
  response.set_cached_tokens(static_cast<int32_t>(job.cached));
  const std::string finish = engine::FinishReason(
      job.first.token, 1, s.max_tokens(), transformer_->config().eos_token_id, s.ignore_eos(),
      std::vector<int32_t>(s.stop_token_ids().begin(), s.stop_token_ids().end()));
  response.set_finish_reason(finish);
  if (!job.ship()) return response;
  if (!finish.empty()) {  // nothing to decode
    ReleaseAsWriter(d, req.request_id(), "finished at the first token");
    return response;
  }
  // Data, flush, then the notification: the decode worker starts the sequence.
  v1::StartRequest start;
  start.set_request_id(req.request_id());
  start.set_reservation_id(d.reservation_id());
  start.set_generation(d.generation());
  *start.mutable_prompt() = req.prompt();
  start.set_first_token(job.first.token);
  *start.mutable_sampling() = s;
  if (job.local_mtp != nullptr) {
    start.mutable_mtp_hidden()->Assign(job.last_hidden.begin(), job.last_hidden.end());
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::StartResponse started;
  grpc::Status st = DecodeStub(d.decode_address())->Start(&ctx, start, &started);
  if (!st.ok()) {
    // FAILED_PRECONDITION: the decode worker refused and already counts us done. Otherwise the
    // Start may never have arrived (or did, and the request fails anyway): say so explicitly.
    if (st.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
      ReleaseAsWriter(d, req.request_id(), "start failed: " + st.error_message());
    }
    return absl::Status(rpc::FromGrpcStatus(st).code(),
                        absl::StrCat("decode worker ", d.decode_address(),
                                     " refused the sequence: ", st.error_message()));
  }
  return response;
}

v1::Decode::Stub* PrefillActor::DecodeStub(const std::string& address) {
  auto& stub = decode_stubs_[address];
  if (stub == nullptr) {
    stub = v1::Decode::NewStub(rpc::InternalChannel(address));
  }
  return stub.get();
}

void PrefillActor::ReleaseAsWriter(const v1::LatentDestination& d, const std::string& request_id,
                                   const std::string& reason) {
  v1::ReleaseRequest release;
  release.set_reservation_id(d.reservation_id());
  release.set_reason(reason);
  release.set_writer_done(true);
  release.set_request_id(request_id);
  release.set_generation(d.generation());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::ReleaseResponse released;
  grpc::Status st = DecodeStub(d.decode_address())->Release(&ctx, release, &released);
  if (!st.ok()) {
    // The decode worker reclaims the blocks at the reservation's deadline anyway.
    SPLITMOE_LOG(WARNING, "prefill").With("reservation", d.reservation_id())
            .With("decode", d.decode_address())
        << "release of the reservation failed: " << st.error_message();
  }
}

void PrefillActor::PublishLoad() {
  v1::WorkerLoad load;
  load.set_latent_bytes_sent(latent_bytes_sent_);
  load.set_latent_tokens(latent_tokens_);
  load.set_tokens_processed(prompts_);
  if (overlap_ != nullptr) load.set_micro_batch_overlaps(overlap_->handoffs());
  gauge_->Set(std::move(load));
}

grpc::ServerUnaryReactor* PrefillService::RunPrefill(grpc::CallbackServerContext* ctx,
                                                     const v1::PrefillRequest* request,
                                                     v1::PrefillResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  in_flight_.fetch_add(1);
  // The context stays valid until Finish, which the reply calls after the handler is done.
  actor_.Send(RunPrompt{*request, [ctx] { return ctx->IsCancelled(); }, absl::Now(),
                        [this, reactor, response](absl::StatusOr<v1::PrefillResponse> r) {
                          in_flight_.fetch_sub(1);
                          if (r.ok()) *response = std::move(*r);
                          reactor->Finish(rpc::ToGrpcStatus(r.status()));
                        }});
  return reactor;
}

grpc::ServerUnaryReactor* PrefillService::CancelPrefill(grpc::CallbackServerContext* ctx,
                                                        const v1::CancelPrefillRequest* request,
                                                        v1::CancelPrefillResponse* response) {
  if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (request->request_id().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "cancel: no request id"));
    return reactor;
  }
  actor_.Send(CancelPrompt{*request,
                           [reactor, response](absl::StatusOr<v1::CancelPrefillResponse> r) {
                             if (r.ok()) *response = std::move(*r);
                             reactor->Finish(rpc::ToGrpcStatus(r.status()));
                           }});
  return reactor;
}

}  // namespace splitmoe::prefill
