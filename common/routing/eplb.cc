#include "common/routing/eplb.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace splitmoe::routing {

LayerPlacement ContiguousPlacement(int32_t experts, int32_t shards) {
  LayerPlacement p;
  p.expert_shards.resize(static_cast<size_t>(experts));
  p.shard_experts.resize(static_cast<size_t>(std::max(shards, 0)));
  for (int32_t s = 0; s < shards; ++s) {
    const int64_t begin = int64_t{s} * experts / shards, end = int64_t{s + 1} * experts / shards;
    for (int64_t e = begin; e < end; ++e) {
      p.expert_shards[static_cast<size_t>(e)].push_back(s);
      p.shard_experts[static_cast<size_t>(s)].push_back(static_cast<int32_t>(e));
    }
  }
  return p;
}

absl::StatusOr<LayerPlacement> BalancedPlacement(absl::Span<const double> load, int32_t shards,
                                                 int32_t slots, absl::Span<const int32_t> homes) {
  const auto n = static_cast<int32_t>(load.size());
  if (n < 1 || shards < 1 || static_cast<int64_t>(slots) * shards < n) {
    return absl::InvalidArgumentError(absl::StrCat(shards, " shards of ", slots,
                                                   " slots cannot hold ", n, " experts"));
  }
  for (double l : load) {
    if (!(l >= 0)) return absl::InvalidArgumentError("expert loads must be >= 0");
  }
  if (!homes.empty() && static_cast<int32_t>(homes.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat(homes.size(), " home shards for ", n, " experts"));
  }
  std::vector<int32_t> used(static_cast<size_t>(shards), 0);
  for (int32_t h : homes) {
    if (h < 0 || h >= shards) return absl::InvalidArgumentError(absl::StrCat("home shard ", h));
    if (++used[static_cast<size_t>(h)] > slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("home shard ", h, " holds more than ", slots, " experts"));
    }
  }
  // All zero: uniform (every expert counts the same).
  const bool none = std::all_of(load.begin(), load.end(), [](double l) { return l == 0; });
  auto weight = [&](int32_t e) { return none ? 1.0 : load[static_cast<size_t>(e)]; };

  // 1. Copies per expert.
  std::vector<int32_t> copies(static_cast<size_t>(n), 1);
  const int64_t spare = static_cast<int64_t>(slots) * shards - n;
  for (int64_t k = 0; k < spare; ++k) {
    int32_t best = -1;
    for (int32_t e = 0; e < n; ++e) {
      if (copies[static_cast<size_t>(e)] >= shards) continue;
      if (best < 0 || weight(e) / copies[static_cast<size_t>(e)] >
                          weight(best) / copies[static_cast<size_t>(best)]) {
        best = e;
      }
    }
    if (best < 0) break;  // every expert on every shard
    ++copies[static_cast<size_t>(best)];
  }

  // 2. Packing.
  LayerPlacement p;
  p.expert_shards.resize(static_cast<size_t>(n));
  p.shard_experts.resize(static_cast<size_t>(shards));
  std::vector<double> shard_load(static_cast<size_t>(shards), 0.0);
  std::vector<int32_t> free_slots(static_cast<size_t>(shards), slots);
  auto place = [&](int32_t e, int32_t s) {
    p.expert_shards[static_cast<size_t>(e)].push_back(s);
    p.shard_experts[static_cast<size_t>(s)].push_back(e);
    shard_load[static_cast<size_t>(s)] += weight(e) / copies[static_cast<size_t>(e)];
    --free_slots[static_cast<size_t>(s)];
  };
  struct Copy {
    int32_t expert;
    double per_copy;
  };
  std::vector<Copy> pending;
  for (int32_t e = 0; e < n; ++e) {
    int32_t to_pack = copies[static_cast<size_t>(e)];
    if (!homes.empty()) {
      place(e, homes[static_cast<size_t>(e)]);
      --to_pack;
    }
    for (int32_t c = 0; c < to_pack; ++c)
      pending.push_back({e, weight(e) / copies[static_cast<size_t>(e)]});
  }
  std::stable_sort(pending.begin(), pending.end(), [](const Copy& a, const Copy& b) {
    return a.per_copy > b.per_copy;
  });
  auto hosts = [&](int32_t s, int32_t e) {
    const auto& on = p.expert_shards[static_cast<size_t>(e)];
    return std::find(on.begin(), on.end(), s) != on.end();
  };
  for (const Copy& c : pending) {
    int32_t best = -1;
    for (int32_t s = 0; s < shards; ++s) {
      if (free_slots[static_cast<size_t>(s)] == 0 || hosts(s, c.expert)) continue;
      if (best < 0 || shard_load[static_cast<size_t>(s)] < shard_load[static_cast<size_t>(best)])
        best = s;
    }
    if (best >= 0) {
      place(c.expert, best);
      continue;
    }
    // Every shard with a free slot already hosts this expert. A copy that was never placed
    // does not exist: its share goes back to the expert's other copies.
    int32_t& k = copies[static_cast<size_t>(c.expert)];
    if (p.expert_shards[static_cast<size_t>(c.expert)].empty()) {
      return absl::InternalError(absl::StrCat("expert ", c.expert, " found no shard"));
    }
    --k;
  }
  // Shard lists ascending (ExpectedShardLoad counts the copies that exist).
  for (auto& experts : p.shard_experts) std::sort(experts.begin(), experts.end());
  return p;
}

std::vector<double> ExpectedShardLoad(absl::Span<const double> load, const LayerPlacement& p) {
  std::vector<double> out(p.shard_experts.size(), 0.0);
  for (size_t e = 0; e < p.expert_shards.size() && e < load.size(); ++e) {
    const auto& on = p.expert_shards[e];
    if (on.empty()) continue;
    for (int32_t s : on) out[static_cast<size_t>(s)] += load[e] / static_cast<double>(on.size());
  }
  return out;
}

double ExpectedMaxVio(absl::Span<const double> load, const LayerPlacement& p) {
  const std::vector<double> per_shard = ExpectedShardLoad(load, p);
  if (per_shard.empty()) return 0;
  double sum = 0, max = 0;
  for (double l : per_shard) {
    sum += l;
    max = std::max(max, l);
  }
  return sum > 0 ? max / (sum / static_cast<double>(per_shard.size())) - 1 : 0;
}

}  // namespace splitmoe::routing
