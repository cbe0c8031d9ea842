#include "prefill/prefill_worker.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/engine/batch_decoder.h"
#include "common/rpc/rpc.h"
#include "prefill/latent_shipper.h"

namespace splitmoe::prefill {
namespace {

v1::TokenLogprob ToProto(const engine::TokenLogprob& lp) {
  v1::TokenLogprob out;
  out.set_token(lp.token);
  out.set_logprob(lp.logprob);
  for (const auto& [id, value] : lp.top) {
    auto* alt = out.add_top();
    alt->set_token(id);
    alt->set_logprob(value);
  }
  return out;
}

// The remote layout named by a destination, checked against this worker's model.
absl::StatusOr<decode::PagedLatentLayout> LayoutOf(const v1::LatentDestination& d,
                                                   const model::ModelConfig& c) {
  if (d.layers() != c.num_hidden_layers || d.latent_dim() != c.latent_dim()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "destination cache has ", d.layers(), " layers x ", d.latent_dim(),
        " values, this model ", c.num_hidden_layers, " x ", c.latent_dim()));
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

}  // namespace

void PrefillActor::Handle(RunPrompt m) {
  uint64_t bytes_put = 0;
  absl::StatusOr<v1::PrefillResponse> r = Run(m, &bytes_put);
  latent_bytes_sent_ += bytes_put;
  ++prompts_;
  if (r.ok()) {
    if (m.request.has_destination() && r->finish_reason().empty())
      latent_tokens_ += static_cast<uint64_t>(m.request.prompt_size());
  }
  PublishLoad();
  m.reply(std::move(r));
}

absl::StatusOr<v1::PrefillResponse> PrefillActor::Run(const RunPrompt& m, uint64_t* bytes_put) {
  const v1::PrefillRequest& req = m.request;
  const model::ModelConfig& c = transformer_->config();
  const bool ship = req.has_destination();
  const v1::LatentDestination& d = req.destination();
  auto cancelled = [&m] { return m.cancelled && m.cancelled(); };
  if (cancelled()) {
    if (ship) ReleaseAsWriter(d, req.request_id(), "cancelled before prefill");
    return absl::CancelledError("prefill cancelled before it started");
  }
  const v1::SamplingParamsInternal& s = req.sampling();
  const engine::SamplingParams sampling{.temperature = s.temperature(),
                                        .top_p = s.top_p() == 0 ? 1.0 : s.top_p(),
                                        .top_k = s.top_k(),
                                        .seed = s.seed()};
  absl::Status valid = engine::ValidateSamplingParams(sampling);
  if (valid.ok() && req.prompt().empty()) valid = absl::InvalidArgumentError("empty prompt");
  std::unique_ptr<LatentShipper> shipper;
  if (valid.ok() && ship) {
    absl::StatusOr<decode::PagedLatentLayout> layout = LayoutOf(d, c);
    if (!layout.ok()) valid = layout.status();
    if (valid.ok() && d.blocks_size() * layout->block_tokens < req.prompt_size()) {
      valid = absl::InvalidArgumentError(absl::StrCat(d.blocks_size(), " reserved blocks of ",
                                                      layout->block_tokens, " tokens cannot hold ",
                                                      req.prompt_size(), " prompt tokens"));
    }
    absl::StatusOr<transfer::PeerId> peer =
        valid.ok() ? transport_->Connect(d.ucx_worker_address()) : absl::StatusOr<uint64_t>(0);
    if (valid.ok() && !peer.ok()) valid = peer.status();
    if (valid.ok()) {
      transfer::RegionDescriptor remote{.worker_address = d.ucx_worker_address(),
                                        .remote_addr = d.remote_base(),
                                        .size_bytes = d.region_bytes(),
                                        .rkey = d.rkey()};
      shipper = std::make_unique<LatentShipper>(
          transport_, *peer, std::move(remote), *layout,
          std::vector<decode::BlockId>(d.blocks().begin(), d.blocks().end()));
    }
  }
  if (!valid.ok()) {
    if (ship) ReleaseAsWriter(d, req.request_id(), std::string(valid.message()));
    return valid;
  }

  // Latents go to the local cache (the transformer computes with it) and from there, layer by
  // layer, into the remote blocks. No put is issued past the transfer deadline.
  const absl::Time deadline = m.received + absl::Milliseconds(d.timeout_ms());
  engine::LatentCache local(c.num_hidden_layers, c.latent_dim());
  std::vector<std::optional<engine::TokenLogprob>> prompt_logprobs;
  std::vector<int32_t> prompt(req.prompt().begin(), req.prompt().end());
  const int64_t logprobs = s.logprobs() > 0 ? s.logprobs() : -1;
  absl::StatusOr<engine::DecodedToken> first = engine::PrefillFirstToken(
      *transformer_, prompt, &local, sampling, logprobs, form_,
      [&](int64_t layer, int64_t from, int64_t count) -> absl::Status {
        if (cancelled()) return absl::CancelledError("prefill cancelled");
        if (!ship) return absl::OkStatus();
        if (d.timeout_ms() > 0 && absl::Now() > deadline) {
          return absl::DeadlineExceededError(
              absl::StrCat("prefill passed its transfer deadline of ", d.timeout_ms(), " ms"));
        }
        shipper->ShipLayer(local, layer, from, count);
        return absl::OkStatus();
      },
      req.prompt_logprobs() > 0 ? &prompt_logprobs : nullptr, req.prompt_logprobs());
  absl::Status status = first.status();
  if (shipper != nullptr) {
    absl::Status flushed = shipper->Finish();  // every put has landed (or failed) after this
    *bytes_put = shipper->bytes_put();
    if (status.ok()) status = flushed;
  }
  if (!status.ok()) {
    if (ship) ReleaseAsWriter(d, req.request_id(), std::string(status.message()));
    return status;
  }

  v1::PrefillResponse response;
  response.set_first_token(first->token);
  if (first->logprob) *response.mutable_first_token_logprob() = ToProto(*first->logprob);
  for (const auto& lp : prompt_logprobs) {
    v1::PromptLogprob* entry = response.add_prompt_logprobs();
    if (lp) *entry->mutable_logprob() = ToProto(*lp);
  }
  response.set_latent_bytes_written(*bytes_put);
  const std::string finish = engine::FinishReason(
      first->token, 1, s.max_tokens(), c.eos_token_id, s.ignore_eos(),
      std::vector<int32_t>(s.stop_token_ids().begin(), s.stop_token_ids().end()));
  response.set_finish_reason(finish);
  if (!ship) return response;
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
  start.set_first_token(first->token);
  *start.mutable_sampling() = s;
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
    stub = v1::Decode::NewStub(grpc::CreateCustomChannel(
        address, grpc::InsecureChannelCredentials(), rpc::ClientChannelArguments()));
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
    std::cerr << "prefill: release of reservation " << d.reservation_id() << " at "
              << d.decode_address() << " failed: " << st.error_message() << "\n";
  }
}

void PrefillActor::PublishLoad() {
  v1::WorkerLoad load;
  load.set_latent_bytes_sent(latent_bytes_sent_);
  load.set_latent_tokens(latent_tokens_);
  load.set_tokens_processed(prompts_);
  gauge_->Set(std::move(load));
}

grpc::ServerUnaryReactor* PrefillService::RunPrefill(grpc::CallbackServerContext* ctx,
                                                     const v1::PrefillRequest* request,
                                                     v1::PrefillResponse* response) {
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

}  // namespace splitmoe::prefill
