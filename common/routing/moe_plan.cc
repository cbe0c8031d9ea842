#include "common/routing/moe_plan.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/engine/routing.h"
#include "common/routing/expert_routing.h"

namespace splitmoe::routing {

bool GroupAligned(const model::ModelConfig& config, absl::Span<const int32_t> expert_to_shard) {
  const int64_t n = static_cast<int64_t>(expert_to_shard.size());
  if (config.n_group < 1 || n % config.n_group != 0) return false;
  const int64_t per_group = n / config.n_group;
  for (int64_t e = 0; e < n; ++e) {
    if (expert_to_shard[e] != expert_to_shard[e - e % per_group]) return false;
  }
  return true;
}

absl::StatusOr<std::vector<ShardBatch>> PlanDispatch(
    const model::ModelConfig& config, absl::Span<const float> scores, int64_t tokens,
    absl::Span<const float> bias, absl::Span<const int32_t> expert_to_shard, int32_t num_shards,
    int32_t max_devices, absl::Span<const std::vector<int32_t>> copies) {
  const int64_t n = config.n_routed_experts;
  if (tokens < 0 || static_cast<int64_t>(scores.size()) != tokens * n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gate scores hold ", scores.size(), " values for ", tokens, " tokens of ", n, " experts"));
  }
  if (static_cast<int64_t>(expert_to_shard.size()) != n ||
      (!bias.empty() && static_cast<int64_t>(bias.size()) != n)) {
    return absl::InvalidArgumentError("placement or bias does not cover every routed expert");
  }
  if (!copies.empty()) {
    if (static_cast<int64_t>(copies.size()) != n) {
      return absl::InvalidArgumentError("expert copies do not cover every routed expert");
    }
    for (int64_t e = 0; e < n; ++e) {
      const auto& on = copies[static_cast<size_t>(e)];
      if (on.empty() || on.front() != expert_to_shard[e]) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert ", e, "'s copies do not start with its primary shard"));
      }
      for (int32_t s : on) {
        if (s < 0 || s >= num_shards) {
          return absl::InvalidArgumentError(absl::StrCat("expert ", e, " copy on shard ", s));
        }
      }
    }
  }
  const bool limited = max_devices > 0 && max_devices < num_shards;
  std::vector<int64_t> batch_load(copies.empty() ? 0 : static_cast<size_t>(num_shards), 0);
  std::vector<int32_t> touched;
  std::optional<ExpertPlacement> placement;
  if (max_devices > 0 && max_devices < num_shards &&
      !(config.UsesGroups() && max_devices >= config.topk_group &&
        GroupAligned(config, expert_to_shard))) {
    auto p = ExpertPlacement::FromAssignment({expert_to_shard.begin(), expert_to_shard.end()},
                                             num_shards);
    if (!p.ok()) return p.status();
    placement = std::move(*p);
  }
  std::vector<ShardBatch> per_shard(static_cast<size_t>(num_shards));
  for (int32_t s = 0; s < num_shards; ++s) {
    per_shard[s].shard = s;
    per_shard[s].offsets.reserve(static_cast<size_t>(tokens) + 1);
    per_shard[s].rows.reserve(static_cast<size_t>(tokens));
  }
  const auto k = static_cast<size_t>(config.num_experts_per_tok);
  std::vector<int32_t> experts(k);
  std::vector<float> weights(k);
  for (int64_t t = 0; t < tokens; ++t) {
    absl::Span<const float> row =
        scores.subspan(static_cast<size_t>(t * n), static_cast<size_t>(n));
    if (placement.has_value()) {
      auto limited = DeviceLimitedTopK(config, row, bias, *placement, max_devices);
      if (!limited.ok()) return limited.status();
      experts = std::move(limited->experts);
      weights = std::move(limited->weights);
    } else {
      engine::SelectExpertsInto(config, row, bias, experts.data(), weights.data());
    }
    touched.clear();
    for (size_t i = 0; i < experts.size(); ++i) {
      int32_t shard = expert_to_shard[experts[i]];
      if (!copies.empty()) {
        const std::vector<int32_t>& on = copies[static_cast<size_t>(experts[i])];
        int32_t best = -1;
        for (int32_t s : on) {  // a shard this token already uses
          if (std::find(touched.begin(), touched.end(), s) == touched.end()) continue;
          if (best < 0 || batch_load[s] < batch_load[best]) best = s;
        }
        if (best < 0 && !limited) {
          for (int32_t s : on) {
            if (best < 0 || batch_load[s] < batch_load[best]) best = s;
          }
        }
        shard = best >= 0 ? best : on.front();
        ++batch_load[shard];
        if (std::find(touched.begin(), touched.end(), shard) == touched.end())
          touched.push_back(shard);
      }
      if (shard < 0 || shard >= num_shards) {
        return absl::FailedPreconditionError(
            absl::StrCat("expert ", experts[i], " has no service"));
      }
      ShardBatch& b = per_shard[shard];
      if (b.rows.empty() || b.rows.back() != t) {
        if (b.offsets.empty()) b.offsets.push_back(0);
        b.rows.push_back(static_cast<int32_t>(t));
        b.offsets.push_back(b.offsets.back());
      }
      b.expert_ids.push_back(experts[i]);
      b.weights.push_back(weights[i]);
      ++b.offsets.back();
    }
  }
  std::vector<ShardBatch> out;
  for (ShardBatch& b : per_shard) {
    if (!b.rows.empty()) out.push_back(std::move(b));
  }
  return out;
}

void CombineShardOutput(const ShardBatch& batch, absl::Span<const float> partial, int64_t hidden,
                        absl::Span<float> out) {
  for (size_t i = 0; i < batch.rows.size(); ++i) {
    float* o = out.data() + static_cast<int64_t>(batch.rows[i]) * hidden;
    const float* p = partial.data() + static_cast<int64_t>(i) * hidden;
    for (int64_t j = 0; j < hidden; ++j) o[j] += p[j];
  }
}

}  // namespace splitmoe::routing
