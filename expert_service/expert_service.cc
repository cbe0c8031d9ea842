#include "expert_service/expert_service.h"

#include "absl/strings/str_cat.h"
#include "common/rpc/security.h"
#include "common/rpc/bidi_stream.h"
#include "common/expert_plane/ucx_expert.h"
#include "common/rpc/rpc.h"

namespace splitmoe::expert_service {

v1::ExpertResult ComputeBatch(const ExpertShard& shard, const v1::ExpertBatch& batch) {
  v1::ExpertResult result;
  result.set_batch_id(batch.batch_id());
  result.set_dtype(batch.dtype());
  const int64_t h = shard.config().hidden_size;
  std::vector<float> hidden;
  absl::Status status =
      rpc::DecodeTensor(batch.hidden(), batch.dtype(), int64_t{batch.tokens()} * h, &hidden);
  std::vector<float> out(static_cast<size_t>(std::max(0, batch.tokens())) * h);
  if (status.ok()) {
    status = shard.Compute(batch.layer(), hidden, batch.tokens(),
                           absl::MakeConstSpan(batch.offsets().data(), batch.offsets_size()),
                           absl::MakeConstSpan(batch.expert_ids().data(), batch.expert_ids_size()),
                           absl::MakeConstSpan(batch.weights().data(), batch.weights_size()),
                           absl::MakeSpan(out));
  }
  if (!status.ok()) {
    result.set_error(absl::StrCat("expert batch ", batch.batch_id(), ": ", status.ToString()));
    return result;
  }
  result.set_output(rpc::EncodeTensor(out, batch.dtype()));
  return result;
}

void ExpertsActor::Handle(ComputeExpertBatch m) {
  auto it = shards_.find(m.batch.placement_id());
  if (it == shards_.end()) {
    v1::ExpertResult result;
    result.set_batch_id(m.batch.batch_id());
    result.set_error(absl::StrCat("expert batch ", m.batch.batch_id(), ": placement ",
                                  m.batch.placement_id(), " is not loaded here"));
    m.reply(std::move(result));
    return;
  }
  last_used_[m.batch.placement_id()] = absl::Now();
  m.reply(ComputeBatch(*it->second, m.batch));
}

void ExpertsActor::Handle(RetirePlacement m) {
  if (m.placement == 0) return m.reply(false);
  auto used = last_used_.find(m.placement);
  if (used != last_used_.end() && absl::Now() - used->second < m.idle) return m.reply(false);
  shards_.erase(m.placement);
  last_used_.erase(m.placement);
  m.reply(true);
}

void ExpertIngress::Submit(v1::ExpertBatch batch, std::function<void(v1::ExpertResult)> answer) {
  ++batches_;
  assignments_ += static_cast<uint64_t>(batch.expert_ids_size());
  ++in_flight_;
  last_batch_us_ = absl::ToUnixMicros(absl::Now());
  const uint64_t id = batch.batch_id();
  // Answered exactly once: by the actor, or with Unavailable if it has stopped.
  experts_.Send(ComputeExpertBatch{
      std::move(batch), [this, answer = std::move(answer), id](absl::StatusOr<v1::ExpertResult> r) {
        --in_flight_;
        if (r.ok()) return answer(std::move(*r));
        v1::ExpertResult failed;
        failed.set_batch_id(id);
        failed.set_error(r.status().ToString());
        answer(std::move(failed));
      }});
}

grpc::ServerBidiReactor<v1::ExpertBatch, v1::ExpertResult>* ExpertComputeService::Compute(
    grpc::CallbackServerContext* context) {
  if (grpc::Status s = rpc::CheckInternalCaller(context); !s.ok()) {
    return rpc::RefusedBidi<v1::ExpertBatch, v1::ExpertResult>(std::move(s));
  }
  using Stream = rpc::BidiStream<v1::ExpertBatch, v1::ExpertResult>;
  return new Stream([this](v1::ExpertBatch batch, Stream::Reply reply) {
    ingress_->Submit(std::move(batch), [reply](v1::ExpertResult r) { reply(std::move(r)); });
  });
}

absl::StatusOr<std::unique_ptr<UcxExpertServer>> UcxExpertServer::Start(
    ExpertIngress* ingress, absl::string_view name, absl::Duration busy_poll) {
  std::unique_ptr<UcxExpertServer> server(new UcxExpertServer());
  server->ingress_ = ingress;
  absl::StatusOr<std::unique_ptr<transfer::UcxTransport>> transport =
      expert_plane::StartExpertTransport(
          name, busy_poll, [raw = server.get()](transfer::Message m) { raw->OnMessage(std::move(m)); });
  if (!transport.ok()) return transport.status();
  server->transport_ = std::move(*transport);
  return server;
}

UcxExpertServer::~UcxExpertServer() {
  if (transport_ != nullptr) transport_->Shutdown();  // null: Start failed before it started
}

void UcxExpertServer::OnMessage(transfer::Message m) {
  v1::ExpertBatch batch;
  if (m.tag != expert_plane::kExpertBatchTag || !batch.ParseFromString(m.payload)) {
    ++malformed_;
    return;
  }
  m.payload.clear();
  ingress_->Submit(std::move(batch), [this, to = m.reply_to](v1::ExpertResult r) {
    transport_->SendReply(to, expert_plane::kExpertResultTag, r.SerializeAsString(),
                          [](absl::Status) {});  // a lost answer fails over at the sender
  });
}

}  // namespace splitmoe::expert_service
