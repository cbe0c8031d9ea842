// The router's MoE fan-out as pure functions: which tokens go to which expert service, with
// which experts and gate weights (PlanDispatch), and how the services' partial sums come back
// together (CombineShardOutput). The selection is the model's own (engine::SelectExperts, bias
// for selection only), so the cluster routes exactly like the single-process engine. Any thread.
//
//   std::vector<ShardBatch> plan = PlanDispatch(config, scores, tokens, bias, expert_to_shard,
//   shards); for (const ShardBatch& b : plan) Send(b.shard, b);        // one ExpertBatch per
//   service CombineShardOutput(b, partial, hidden_size, out);         // for each reply
#ifndef SPLITMOE_COMMON_ROUTING_MOE_PLAN_H_
#define SPLITMOE_COMMON_ROUTING_MOE_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model/config.h"

namespace splitmoe::routing {

// The work of one expert service for one MoE batch.
struct ShardBatch {
  int32_t shard = 0;
  std::vector<int32_t> rows;     // batch rows routed here, ascending
  std::vector<int32_t> offsets;  // rows.size() + 1: row i uses expert_ids[offsets[i]..offsets[i+1])
  std::vector<int32_t> expert_ids;  // global expert ids, in the token's selection order
  std::vector<float> weights;       // gate weights, aligned with expert_ids
};

// True when every expert group of the model lies on one shard (expert_to_shard [n_routed]). Then
// the model's own group limit keeps a token's experts within topk_group shards, and device-
// limited routing with M >= topk_group is exactly the model's selection (so PlanDispatch skips
// DeviceLimitedTopK: the same result, far cheaper).
bool GroupAligned(const model::ModelConfig& config, absl::Span<const int32_t> expert_to_shard);

// scores [tokens, n_routed] (softmax/sigmoid, unbiased); bias [n_routed] or empty;
// expert_to_shard [n_routed] in [0, num_shards). max_devices > 0: device-limited routing
// (DeviceLimitedTopK: every token's experts on at most that many services); 0: the model's own
// selection unchanged. Shards with no token get no batch.
//
// `copies` [n_routed] (or empty): the shards holding each expert (redundant experts, EPLB); then
// `expert_to_shard` names each expert's primary (the first of its copies), on which device-
// limited selection counts. Each assignment goes to a copy on a shard the token already uses,
// the least loaded of those in this batch; failing that, with a device limit, to the primary
// (so a token never uses more shards than its primaries: the bound holds), without one, to the
// least loaded copy. The selection itself never depends on the copies.
absl::StatusOr<std::vector<ShardBatch>> PlanDispatch(
    const model::ModelConfig& config, absl::Span<const float> scores, int64_t tokens,
    absl::Span<const float> bias, absl::Span<const int32_t> expert_to_shard, int32_t num_shards,
    int32_t max_devices = 0, absl::Span<const std::vector<int32_t>> copies = {});

// Adds a service's partial sums partial [batch.rows.size(), hidden] into out [tokens, hidden].
void CombineShardOutput(const ShardBatch& batch, absl::Span<const float> partial, int64_t hidden,
                        absl::Span<float> out);

}  // namespace splitmoe::routing

#endif  // SPLITMOE_COMMON_ROUTING_MOE_PLAN_H_
