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
  kernels::Linear(x, rows, gate, scores);
  kernels::ScoreRows(scores, rows, gate.rows, config.scoring_func == model::ScoringFunc::kSigmoid);
}

namespace {

#if defined(__AVX2__)
// Largest lane of v.
inline float HMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Transposes the 8x8 matrix whose rows are r[0..7]: afterwards r[j] holds lane j of every row.
inline void Transpose8x8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// The grouped selection (group_limited_greedy / noaux_tc) with AVX2, for groups of a multiple of
// 8 experts whose kept groups hold at least k experts. The same result as the scalar path, bit
// for bit: group scores are the same values added in the same order; the k experts come out by
// value descending, ties towards the lower index. The candidates (the kept groups' experts in
// ascending order) are held as 8-lane vectors with each vector's maximum beside them; a round
// takes the first vector whose maximum is the round's best and in it the first lane holding it
// (so the lowest expert index among equals), retires that lane and refreshes that vector's
// maximum only. False when the shape does not qualify.
bool SelectGroupedAvx2(const model::ModelConfig& config, const float* choice, int64_t n,
                       int32_t* experts) {
  const int64_t groups = config.n_group, per_group = n / groups, k = config.num_experts_per_tok;
  if (per_group % 8 != 0 || per_group * groups != n || groups > 64 ||
      config.topk_group * per_group < k || k > 16 || n > 1024) {
    return false;
  }
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  TopKSelector kept(config.topk_group);
  if (groups == 8) {
    // All eight groups at once: lane-wise top two (or max) over each group's vectors, transposed
    // so that lane g holds group g, then the top two over the 8 (or 16) values of each lane.
    __m256 t1[8], t2[8];
    const bool top2 = config.topk_method == model::TopkMethod::kNoauxTc;
    for (int64_t g = 0; g < 8; ++g) {
      const float* m = choice + g * per_group;
      __m256 a = _mm256_loadu_ps(m), b = neg_inf;
      for (int64_t j = 8; j < per_group; j += 8) {
        const __m256 v = _mm256_loadu_ps(m + j);
        if (top2) b = _mm256_max_ps(b, _mm256_min_ps(a, v));
        a = _mm256_max_ps(a, v);
      }
      t1[g] = a;
      t2[g] = b;
    }
    Transpose8x8(t1);
    __m256 first = t1[0], second = neg_inf;
    for (int j = 1; j < 8; ++j) {
      if (top2) second = _mm256_max_ps(second, _mm256_min_ps(first, t1[j]));
      first = _mm256_max_ps(first, t1[j]);
    }
    alignas(32) float score[8];
    if (top2) {
      Transpose8x8(t2);
      for (int j = 0; j < 8; ++j) {
        second = _mm256_max_ps(second, _mm256_min_ps(first, t2[j]));
        first = _mm256_max_ps(first, t2[j]);
      }
      _mm256_store_ps(score, _mm256_add_ps(first, second));
    } else {
      _mm256_store_ps(score, first);
    }
    for (int32_t g = 0; g < 8; ++g) kept.Offer(score[g], g);
  }
  for (int64_t g = 0; g < groups && groups != 8; ++g) {
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
  // The kept groups in ascending order; their experts' vectors and each vector's maximum.
  int32_t groups_kept[64];
  const int64_t n_kept = static_cast<int64_t>(kept.indices().size());
  std::copy(kept.indices().begin(), kept.indices().end(), groups_kept);
  std::sort(groups_kept, groups_kept + n_kept);
  const int64_t per_group_vectors = per_group / 8;
  const int64_t vectors = n_kept * per_group_vectors;
  const int64_t vmax_vectors = (vectors + 7) / 8;
  __m256 cand[128];        // the candidates, 8 experts a vector, in ascending expert order
  int32_t first_expert[128];  // the expert in lane 0 of each candidate vector
  alignas(32) float vmax_lanes[128];
  for (int64_t i = 0; i < n_kept; ++i) {
    const float* src = choice + groups_kept[i] * per_group;
    for (int64_t j = 0; j < per_group_vectors; ++j) {
      const int64_t v = i * per_group_vectors + j;
      cand[v] = _mm256_loadu_ps(src + 8 * j);
      first_expert[v] = static_cast<int32_t>(groups_kept[i] * per_group + 8 * j);
      vmax_lanes[v] = HMax(cand[v]);
    }
  }
  for (int64_t v = vectors; v < 8 * vmax_vectors; ++v) {
    vmax_lanes[v] = -std::numeric_limits<float>::infinity();
  }
  __m256 vmax[16];  // each candidate vector's maximum, 8 a vector
  for (int64_t j = 0; j < vmax_vectors; ++j) vmax[j] = _mm256_load_ps(vmax_lanes + 8 * j);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t round = 0; round < k; ++round) {
    __m256 best_v = vmax[0];
    for (int64_t j = 1; j < vmax_vectors; ++j) best_v = _mm256_max_ps(best_v, vmax[j]);
    const float best = HMax(best_v);
    const __m256 target = _mm256_set1_ps(best);
    int64_t at_vector = -1;
    for (int64_t j = 0; j < vmax_vectors && at_vector < 0; ++j) {
      const int mask = _mm256_movemask_ps(_mm256_cmp_ps(vmax[j], target, _CMP_EQ_OQ));
      if (mask != 0) at_vector = 8 * j + __builtin_ctz(static_cast<unsigned>(mask));
    }
    if (at_vector < 0) return false;  // NaN scores: the scalar path decides
    const int lane_mask =
        _mm256_movemask_ps(_mm256_cmp_ps(cand[at_vector], target, _CMP_EQ_OQ));
    const int lane = __builtin_ctz(static_cast<unsigned>(lane_mask));
    experts[round] = first_expert[at_vector] + lane;
    // Retire the lane and refresh the vector's maximum, in registers (no store to reload).
    cand[at_vector] = _mm256_blendv_ps(
        cand[at_vector], neg_inf,
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(iota, _mm256_set1_epi32(lane))));
    const __m256 refreshed = _mm256_set1_ps(HMax(cand[at_vector]));
    const int64_t jv = at_vector / 8;
    vmax[jv] = _mm256_blendv_ps(
        vmax[jv], refreshed,
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(iota, _mm256_set1_epi32(static_cast<int>(at_vector % 8)))));
  }
  return true;
}
#endif  // __AVX2__

}  // namespace

void SelectExpertsInto(const model::ModelConfig& config, absl::Span<const float> scores,
                       absl::Span<const float> bias, int32_t* experts, float* weights) {
  const int64_t n = static_cast<int64_t>(scores.size());
  const int64_t k = config.num_experts_per_tok;
  alignas(32) float biased[1024];
  const float* choice = scores.data();
  if (config.HasScoreBias() && !bias.empty() && n <= 1024) {
    int64_t e = 0;
#if defined(__AVX2__)
    for (; e + 8 <= n; e += 8) {
      _mm256_store_ps(biased + e, _mm256_add_ps(_mm256_loadu_ps(scores.data() + e),
                                                _mm256_loadu_ps(bias.data() + e)));
    }
#endif
    for (; e < n; ++e) biased[e] = scores[e] + bias[e];
    choice = biased;
  }
  absl::InlinedVector<float, 256> large;  // more experts than the stack buffer holds
  if (config.HasScoreBias() && !bias.empty() && n > 1024) {
    large.assign(scores.begin(), scores.end());
    for (int64_t e = 0; e < n; ++e) large[e] += bias[e];
    choice = large.data();
  }
#if defined(__AVX2__)
  if (config.UsesGroups() && SelectGroupedAvx2(config, choice, n, experts)) {
    GateWeightsInto(config, scores, absl::MakeConstSpan(experts, static_cast<size_t>(k)), weights);
    return;
  }
#endif
  TopKSelector best(k);
  if (config.UsesGroups()) {
    const int64_t groups = config.n_group, per_group = n / groups;
    TopKSelector kept(config.topk_group);
    for (int64_t g = 0; g < groups; ++g) {
      const float* m = choice + g * per_group;
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
  std::copy(best.indices().begin(), best.indices().end(), experts);
  GateWeightsInto(config, scores, best.indices(), weights);
}

ExpertChoice SelectExperts(const model::ModelConfig& config, absl::Span<const float> scores,
                           absl::Span<const float> bias) {
  const auto k = static_cast<size_t>(config.num_experts_per_tok);
  ExpertChoice out;
  out.experts.resize(k);
  out.weights.resize(k);
  SelectExpertsInto(config, scores, bias, out.experts.data(), out.weights.data());
  return out;
}

void GateWeightsInto(const model::ModelConfig& config, absl::Span<const float> scores,
                     absl::Span<const int32_t> experts, float* weights) {
  const size_t k = experts.size();
  for (size_t i = 0; i < k; ++i) weights[i] = scores[experts[i]];
  if (config.norm_topk_prob && k > 1) {
    float sum = 0.0f;
    for (size_t i = 0; i < k; ++i) sum += weights[i];
    for (size_t i = 0; i < k; ++i) weights[i] /= sum;
  }
  for (size_t i = 0; i < k; ++i) weights[i] *= static_cast<float>(config.routed_scaling_factor);
}

std::vector<float> GateWeights(const model::ModelConfig& config, absl::Span<const float> scores,
                               absl::Span<const int32_t> experts) {
  std::vector<float> weights(experts.size());
  GateWeightsInto(config, scores, experts, weights.data());
  return weights;
}

}  // namespace splitmoe::engine
