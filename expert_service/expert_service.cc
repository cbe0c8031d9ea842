#include "expert_service/expert_service.h"

#include "absl/strings/str_cat.h"
#include "common/rpc/bidi_stream.h"
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

grpc::ServerBidiReactor<v1::ExpertBatch, v1::ExpertResult>* ExpertComputeService::Compute(
    grpc::CallbackServerContext* /*context*/) {
  using Stream = rpc::BidiStream<v1::ExpertBatch, v1::ExpertResult>;
  return new Stream([this](v1::ExpertBatch batch, Stream::Reply reply) {
    ++batches_;
    auto shared = std::make_shared<v1::ExpertBatch>(std::move(batch));
    const bool posted = post_([this, shared, reply] { reply(ComputeBatch(*shard_, *shared)); });
    if (!posted) {
      v1::ExpertResult stopped;
      stopped.set_batch_id(shared->batch_id());
      stopped.set_error("expert service is stopping");
      reply(std::move(stopped));
    }
  });
}

}  // namespace splitmoe::expert_service
