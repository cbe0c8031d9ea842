#include "router/expert_router.h"

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc.h"

namespace splitmoe::router {

void ExpertRouter::Handle(UsePlacement m) {
  placement_ = std::move(m.placement);
  clients_ = std::move(m.clients);
}

void ExpertRouter::Handle(RouteMoeBatch m, runtime::Context<Message>& ctx) {
  v1::MoeBatch& batch = m.batch;
  Reply& reply = m.reply;
  const int64_t tokens = batch.tokens(), h = config_.hidden_size, n = config_.n_routed_experts;
  auto fail_now = [&](const std::string& error) {
    v1::MoeResult r;
    r.set_batch_id(batch.batch_id());
    r.set_error(error);
    reply(std::move(r));
  };
  if (!placement_.complete()) {
    std::vector<int32_t> missing;
    for (size_t e = 0; e < placement_.expert_to_service.size(); ++e) {
      if (placement_.expert_to_service[e] < 0) missing.push_back(static_cast<int32_t>(e));
    }
    return fail_now(absl::StrCat("UNAVAILABLE: no healthy expert service hosts expert ",
                                 missing.empty() ? -1 : missing.front(), " (", missing.size(),
                                 " experts uncovered)"));
  }
  std::vector<float> scores;
  absl::Status s = rpc::DecodeTensor(batch.scores(), v1::WIRE_DTYPE_FP32, tokens * n, &scores);
  if (s.ok() && batch.hidden().size() != static_cast<size_t>(tokens * h) *
                                             (batch.dtype() == v1::WIRE_DTYPE_BF16 ? 2 : 4)) {
    s = absl::InvalidArgumentError(
        absl::StrCat("hidden holds ", batch.hidden().size(), " bytes for ", tokens, " tokens"));
  }
  const size_t layer = static_cast<size_t>(batch.layer());
  if (s.ok() && (batch.layer() < 0 || layer >= biases_.size())) {
    s = absl::InvalidArgumentError(absl::StrCat("layer ", batch.layer(), " out of range"));
  }
  if (!s.ok()) return fail_now(s.ToString());
  auto plan = PlanDispatch(config_, scores, tokens, biases_[layer], placement_.expert_to_service,
                           static_cast<int32_t>(placement_.services.size()), max_devices_);
  if (!plan.ok()) return fail_now(plan.status().ToString());
  if (expert_tokens_.empty()) expert_tokens_.assign(static_cast<size_t>(n), 0);
  for (const ShardBatch& b : *plan) {
    for (int32_t e : b.expert_ids) ++expert_tokens_[e];
  }
  const uint64_t id = next_id_++;
  Pending& p = pending_[id];
  p.batch = std::move(batch);
  p.reply = std::move(reply);
  p.plan = std::move(*plan);
  p.partial.resize(p.plan.size());
  p.remaining = p.plan.size();
  if (p.remaining == 0) {  // zero tokens: nothing to send, answer at once
    return Handle(ExpertServiceAnswered{id, 0, absl::CancelledError("empty")});
  }
  // Gather each service's rows once; the hidden bytes are sliced, not re-encoded.
  const size_t width = p.batch.dtype() == v1::WIRE_DTYPE_BF16 ? 2 : 4;
  for (size_t i = 0; i < p.plan.size(); ++i) {
    const ShardBatch& b = p.plan[i];
    v1::ExpertBatch eb;
    eb.set_batch_id(id * 1024 + i);
    eb.set_layer(p.batch.layer());
    eb.set_tokens(static_cast<int32_t>(b.rows.size()));
    eb.set_dtype(p.batch.dtype());
    std::string* hidden = eb.mutable_hidden();
    hidden->reserve(b.rows.size() * h * width);
    for (int32_t row : b.rows)
      hidden->append(p.batch.hidden(), static_cast<size_t>(row) * h * width, h * width);
    *eb.mutable_offsets() = {b.offsets.begin(), b.offsets.end()};
    *eb.mutable_expert_ids() = {b.expert_ids.begin(), b.expert_ids.end()};
    *eb.mutable_weights() = {b.weights.begin(), b.weights.end()};
    const std::string& service = placement_.services[b.shard];
    auto client = clients_.find(service);
    if (client == clients_.end()) {
      Handle(ExpertServiceAnswered{
          id, i,
          absl::UnavailableError(absl::StrCat("no connection to expert service ", service))});
      continue;
    }
    // The answer comes back to this actor as a message; if the actor has stopped, the batch is
    // gone with it (and so is the stream it would have replied on).
    client->second->Send(std::move(eb),
                         [self = ctx.self(), id, i](absl::StatusOr<v1::ExpertResult> r) {
                           self.Send(ExpertServiceAnswered{id, i, std::move(r)});
                         });
  }
}

void ExpertRouter::Handle(ExpertServiceAnswered m) {
  const uint64_t pending_id = m.pending;
  const size_t index = m.index;
  absl::StatusOr<v1::ExpertResult>& result = m.result;
  auto it = pending_.find(pending_id);
  if (it == pending_.end()) return;
  Pending& p = it->second;
  const int64_t h = config_.hidden_size;
  if (!p.plan.empty()) {
    if (!result.ok()) {
      p.error = result.status().ToString();
    } else if (!result->error().empty()) {
      p.error = result->error();
    } else {
      absl::Status s =
          rpc::DecodeTensor(result->output(), result->dtype(),
                            static_cast<int64_t>(p.plan[index].rows.size()) * h, &p.partial[index]);
      if (!s.ok()) p.error = s.ToString();
    }
    if (--p.remaining > 0) return;
  }
  v1::MoeResult r;
  r.set_batch_id(p.batch.batch_id());
  if (!p.error.empty()) {
    r.set_error(p.error);
  } else {
    // Sum in service order: deterministic for a given placement.
    std::vector<float> out(static_cast<size_t>(p.batch.tokens()) * h, 0.0f);
    for (size_t i = 0; i < p.plan.size(); ++i)
      CombineShardOutput(p.plan[i], p.partial[i], h, absl::MakeSpan(out));
    r.set_dtype(p.batch.dtype());
    r.set_output(rpc::EncodeTensor(out, p.batch.dtype()));
  }
  Reply reply = std::move(p.reply);
  pending_.erase(it);
  reply(std::move(r));
}

}  // namespace splitmoe::router
