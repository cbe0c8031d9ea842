// EPLB-style expert placement (DeepSeek's expert-parallel load balancer, re-derived): from the
// observed load of every routed expert of one MoE layer, decide how many copies each expert gets
// (redundant experts: the hottest get more) and on which expert shards they sit, so that the
// expected load per shard is even. Pure functions.
//
// What it optimises: the maximum over shards of the expected tokens a shard computes per batch,
// where an expert's load is split evenly over its copies. Under that model the best it can do is
// every shard at the mean; MaxVio = max shard load / mean shard load - 1 is what it reports
// before and after. Algorithm (both steps greedy, as DeepSeek's EPLB):
//   1. Copies: every expert starts with one; each of the `slots x shards - experts` spare slots
//      goes, one at a time, to the expert with the largest load per copy (ties: lower id), never
//      beyond one copy per shard.
//   2. Packing: copies by descending load per copy (ties: lower expert id) go to the shard with
//      the least expected load that has a free slot and no copy of that expert yet (ties: lower
//      shard). With `homes` (fixed mode), every expert's first copy stays on its home shard and
//      only the extra copies are packed: this keeps a group-aligned placement's homes, so device-
//      limited routing on the homes stays exactly the model's, and the copies only ever take
//      tokens that already touch their shard (routing::PlanDispatch), never adding a shard.
// An expert's first listed shard is its primary (its home in fixed mode): the shard device-
// limited selection counts it on.
//
//   LayerPlacement p = *BalancedPlacement(load, /*shards=*/4, /*slots=*/5, {});
//   double before = ExpectedMaxVio(load, ContiguousPlacement(64, 4)), after = ExpectedMaxVio(load, p);
#ifndef SPLITMOE_COMMON_ROUTING_EPLB_H_
#define SPLITMOE_COMMON_ROUTING_EPLB_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace splitmoe::routing {

struct LayerPlacement {
  std::vector<std::vector<int32_t>> expert_shards;  // [expert] -> shards, primary first
  std::vector<std::vector<int32_t>> shard_experts;  // [shard] -> experts, ascending
};

// Shard s of n holds experts [s * E / n, (s + 1) * E / n), one copy each (the default).
LayerPlacement ContiguousPlacement(int32_t experts, int32_t shards);

// `load` [experts] >= 0 (any scale; all zero means uniform). `slots`: copies a shard may hold
// (>= ceil(experts / shards)). `homes` [experts] or empty: fixed mode (each home in [0, shards),
// and no home may hold more than `slots` experts). InvalidArgument otherwise.
absl::StatusOr<LayerPlacement> BalancedPlacement(absl::Span<const double> load, int32_t shards,
                                                 int32_t slots, absl::Span<const int32_t> homes);

// Expected load per shard (an expert's load split evenly over its copies), and MaxVio from it
// (0 when there is no load).
std::vector<double> ExpectedShardLoad(absl::Span<const double> load, const LayerPlacement& p);
double ExpectedMaxVio(absl::Span<const double> load, const LayerPlacement& p);

}  // namespace splitmoe::routing

#endif  // SPLITMOE_COMMON_ROUTING_EPLB_H_
