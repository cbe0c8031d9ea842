#include "common/engine/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <numeric>

#include "absl/container/inlined_vector.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/kernels/cpu_ops.h"

namespace splitmoe::engine {
namespace {

// The k best of values offered in ascending index order, ordered by value descending, ties
// towards the lower index: exactly std::partial_sort's first k under that order (so with fewer
// than k finite values the lowest-indexed -inf ones fill in), in O(n k) with no allocation for
// the small k of routing (experts per token, groups kept).
class TopKSelector {
 public:
  explicit TopKSelector(int64_t k) : k_(k), values_(static_cast<size_t>(k)), index_(static_cast<size_t>(k)) {}
  void Offer(float v, int32_t i) {
    if (size_ == k_) {
      if (!(v > values_[static_cast<size_t>(k_ - 1)])) return;
      --size_;  // the last one leaves
    }
    int64_t p = size_;
    while (p > 0 && v > values_[static_cast<size_t>(p - 1)]) {
      values_[static_cast<size_t>(p)] = values_[static_cast<size_t>(p - 1)];
      index_[static_cast<size_t>(p)] = index_[static_cast<size_t>(p - 1)];
      --p;
    }
    values_[static_cast<size_t>(p)] = v;
    index_[static_cast<size_t>(p)] = i;
    ++size_;
  }
  std::vector<int32_t> Indices() const {
    return std::vector<int32_t>(index_.begin(), index_.begin() + size_);
  }
  absl::Span<const int32_t> indices() const {
    return absl::MakeConstSpan(index_.data(), static_cast<size_t>(size_));
  }

 private:
  int64_t k_;
  int64_t size_ = 0;
  absl::InlinedVector<float, 16> values_;
  absl::InlinedVector<int32_t, 16> index_;
};

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

#if defined(__AVX2__)
// Largest lane of v.
inline float HMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// The grouped selection (group_limited_greedy / noaux_tc) with AVX2, for groups of a multiple of
// 8 experts whose kept groups hold at least k experts. The same result as the scalar path, bit
// for bit: group scores are the same values added in the same order; the k experts come out by
// value descending, ties towards the lower index (each round takes the first lane, in ascending
// expert order, that holds the round's maximum). False when the shape does not qualify.
bool SelectGroupedAvx2(const model::ModelConfig& config, const float* choice, int64_t n,
                       std::vector<int32_t>* experts) {
  const int64_t groups = config.n_group, per_group = n / groups, k = config.num_experts_per_tok;
  if (per_group % 8 != 0 || per_group * groups != n || groups > 64 ||
      config.topk_group * per_group < k || k > 16 || n > 1024) {
    return false;
  }
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  TopKSelector kept(config.topk_group);
  for (int64_t g = 0; g < groups; ++g) {
    const float* m = choice + g * per_group;
    float score;
    if (config.topk_method == model::TopkMethod::kNoauxTc) {
      // Lane-wise top two over the group's vectors, then over the lanes.
      __m256 t1 = _mm256_loadu_ps(m), t2 = neg_inf;
      for (int64_t j = 8; j < per_group; j += 8) {
        const __m256 v = _mm256_loadu_ps(m + j);
        t2 = _mm256_max_ps(t2, _mm256_min_ps(t1, v));
        t1 = _mm256_max_ps(t1, v);
      }
      const float first = HMax(t1);
      const int at_first = _mm256_movemask_ps(_mm256_cmp_ps(t1, _mm256_set1_ps(first), _CMP_EQ_OQ));
      float second;
      if (__builtin_popcount(static_cast<unsigned>(at_first)) > 1) {
        second = first;  // two lanes hold the maximum
      } else {
        const __m256 others = _mm256_blendv_ps(
            t1, neg_inf, _mm256_cmp_ps(t1, _mm256_set1_ps(first), _CMP_EQ_OQ));
        second = std::max(HMax(t2), HMax(others));
      }
      score = first + second;
    } else {
      __m256 t = _mm256_loadu_ps(m);
      for (int64_t j = 8; j < per_group; j += 8) t = _mm256_max_ps(t, _mm256_loadu_ps(m + j));
      score = HMax(t);
    }
    kept.Offer(score, static_cast<int32_t>(g));
  }
  // The kept groups' experts, in ascending expert order.
  std::vector<int32_t> groups_kept = kept.Indices();
  std::sort(groups_kept.begin(), groups_kept.end());
  alignas(32) float cand[1024];
  int32_t base[64];
  int64_t c = 0;
  for (size_t i = 0; i < groups_kept.size(); ++i) {
    base[i] = static_cast<int32_t>(groups_kept[i] * per_group);
    std::memcpy(cand + c, choice + base[i], static_cast<size_t>(per_group) * sizeof(float));
    c += per_group;
  }
  const int64_t vectors = c / 8;
  experts->clear();
  for (int64_t round = 0; round < k; ++round) {
    __m256 a = _mm256_load_ps(cand), b = neg_inf;
    for (int64_t v = 1; v + 1 < vectors; v += 2) {
      a = _mm256_max_ps(a, _mm256_load_ps(cand + 8 * v));
      b = _mm256_max_ps(b, _mm256_load_ps(cand + 8 * (v + 1)));
    }
    if (vectors % 2 == 0) a = _mm256_max_ps(a, _mm256_load_ps(cand + 8 * (vectors - 1)));
    const float best = HMax(_mm256_max_ps(a, b));
    const __m256 target = _mm256_set1_ps(best);
    for (int64_t v = 0; v < vectors; ++v) {
      const int mask =
          _mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(cand + 8 * v), target, _CMP_EQ_OQ));
      if (mask == 0) continue;
      const int64_t at = 8 * v + __builtin_ctz(static_cast<unsigned>(mask));
      const int64_t group = at / per_group;
      experts->push_back(static_cast<int32_t>(base[group] + (at - group * per_group)));
      cand[at] = -std::numeric_limits<float>::infinity();
      break;
    }
  }
  return static_cast<int64_t>(experts->size()) == k;
}
#endif  // __AVX2__

ExpertChoice SelectExperts(const model::ModelConfig& config, absl::Span<const float> scores,
                           absl::Span<const float> bias) {
  const int64_t n = static_cast<int64_t>(scores.size());
  absl::InlinedVector<float, 256> choice(scores.begin(), scores.end());
  if (config.HasScoreBias() && !bias.empty()) {
    for (int64_t e = 0; e < n; ++e) choice[e] += bias[e];
  }
#if defined(__AVX2__)
  if (config.UsesGroups()) {
    ExpertChoice out;
    if (SelectGroupedAvx2(config, choice.data(), n, &out.experts)) {
      out.weights = GateWeights(config, scores, out.experts);
      return out;
    }
  }
#endif
  TopKSelector best(config.num_experts_per_tok);
  if (config.UsesGroups()) {
    const int64_t groups = config.n_group, per_group = n / groups;
    TopKSelector kept(config.topk_group);
    for (int64_t g = 0; g < groups; ++g) {
      const float* m = choice.data() + g * per_group;
      float score;
      if (config.topk_method == model::TopkMethod::kNoauxTc) {
        // The sum of the group's two largest values (which of equal ones does not matter).
        float first = -std::numeric_limits<float>::infinity(), second = first;
        for (int64_t j = 0; j < per_group; ++j) {
          if (m[j] > first) {
            second = first;
            first = m[j];
          } else if (m[j] > second) {
            second = m[j];
          }
        }
        score = first + second;
      } else {
        score = *std::max_element(m, m + per_group);
      }
      kept.Offer(score, static_cast<int32_t>(g));
    }
    absl::InlinedVector<bool, 64> keep(static_cast<size_t>(groups), false);
    for (int32_t g : kept.indices()) keep[static_cast<size_t>(g)] = true;
    for (int64_t e = 0; e < n; ++e) {
      best.Offer(keep[static_cast<size_t>(e / per_group)] ? choice[e]
                                                          : -std::numeric_limits<float>::infinity(),
                 static_cast<int32_t>(e));
    }
  } else {
    for (int64_t e = 0; e < n; ++e) best.Offer(choice[e], static_cast<int32_t>(e));
  }
  ExpertChoice out;
  out.experts = best.Indices();
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
