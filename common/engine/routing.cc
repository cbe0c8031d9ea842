#include "common/engine/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/kernels/cpu_ops.h"

namespace splitmoe::engine {
namespace {

// Indices of the k largest values, ties towards the lower index, in descending order.
std::vector<int32_t> TopK(absl::Span<const float> values, int64_t k) {
  std::vector<int32_t> idx(values.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    if (values[a] != values[b]) return values[a] > values[b];
    return a < b;
  });
  idx.resize(static_cast<size_t>(k));
  return idx;
}

}  // namespace

void GateScores(const model::ModelConfig& config, const float* x, int64_t rows,
                const model::Matrix& gate, float* scores) {
  const int64_t n = gate.rows;
  kernels::Linear(x, rows, gate, scores);
  for (int64_t t = 0; t < rows; ++t) {
    float* s = scores + t * n;
    if (config.scoring_func == model::ScoringFunc::kSoftmax) {
      kernels::SoftmaxInPlace(s, n);
    } else {
      for (int64_t e = 0; e < n; ++e) s[e] = 1.0f / (1.0f + std::exp(-s[e]));
    }
  }
}

ExpertChoice SelectExperts(const model::ModelConfig& config, absl::Span<const float> scores,
                           absl::Span<const float> bias) {
  const int64_t n = static_cast<int64_t>(scores.size());
  std::vector<float> choice(scores.begin(), scores.end());
  if (config.HasScoreBias() && !bias.empty()) {
    for (int64_t e = 0; e < n; ++e) choice[e] += bias[e];
  }
  if (config.UsesGroups()) {
    const int64_t groups = config.n_group, per_group = n / groups;
    std::vector<float> group_score(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) {
      absl::Span<const float> members(choice.data() + g * per_group,
                                      static_cast<size_t>(per_group));
      if (config.topk_method == model::TopkMethod::kNoauxTc) {
        std::vector<int32_t> top2 = TopK(members, 2);
        group_score[g] = members[top2[0]] + members[top2[1]];
      } else {
        group_score[g] = *std::max_element(members.begin(), members.end());
      }
    }
    std::vector<int32_t> kept = TopK(group_score, config.topk_group);
    std::vector<bool> keep(static_cast<size_t>(groups), false);
    for (int32_t g : kept) keep[g] = true;
    for (int64_t e = 0; e < n; ++e) {
      if (!keep[e / per_group]) choice[e] = -std::numeric_limits<float>::infinity();
    }
  }
  ExpertChoice out;
  out.experts = TopK(choice, config.num_experts_per_tok);
  out.weights = GateWeights(config, scores, out.experts);
  return out;
}

std::vector<float> GateWeights(const model::ModelConfig& config, absl::Span<const float> scores,
                               absl::Span<const int32_t> experts) {
  std::vector<float> weights;
  weights.reserve(experts.size());
  for (int32_t e : experts) weights.push_back(scores[e]);
  if (config.norm_topk_prob && weights.size() > 1) {
    float sum = 0.0f;
    for (float w : weights) sum += w;
    for (float& w : weights) w /= sum;
  }
  for (float& w : weights) w *= static_cast<float>(config.routed_scaling_factor);
  return weights;
}

}  // namespace splitmoe::engine
