// Expert routing of DeepSeekMoE: gate scores and top-k selection with every mode of
// DeepSeek-V2/V3 (greedy, group_limited_greedy, noaux_tc), the per-expert bias used for the
// selection only, normalisation and routed_scaling_factor. Pure functions; any thread.
// The router of the cluster runs the same SelectExperts, so the split system routes exactly
// like the single-process engine.
//
//   GateScores(config, x, T, gate, scores);               // scores [T, n_routed]
//   ExpertChoice choice = SelectExperts(config, scores_row, bias);
#ifndef SPLITMOE_COMMON_ENGINE_ROUTING_H_
#define SPLITMOE_COMMON_ENGINE_ROUTING_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "common/model/config.h"
#include "common/model/tensor.h"

namespace splitmoe::engine {

struct ExpertChoice {
  std::vector<int32_t> experts;  // [num_experts_per_tok], in selection order
  std::vector<float> weights;    // gate weights from the unbiased scores
};

// scores[t, e] = softmax or sigmoid of (x[t] . gate[e]), fp32. x [rows, hidden].
void GateScores(const model::ModelConfig& config, const float* x, int64_t rows,
                const model::Matrix& gate, float* scores);

// Selection for one token. `scores` [n_routed] from GateScores; `bias` [n_routed] or empty.
// Ties are broken towards the lower expert (and group) index.
ExpertChoice SelectExperts(const model::ModelConfig& config, absl::Span<const float> scores,
                           absl::Span<const float> bias);
// The same without allocating (what per-token hot loops call): writes num_experts_per_tok
// experts, in selection order, and their gate weights to the caller's arrays.
void SelectExpertsInto(const model::ModelConfig& config, absl::Span<const float> scores,
                       absl::Span<const float> bias, int32_t* experts, float* weights);

// Gate weights of chosen `experts` (in their order): the unbiased scores, divided by their sum
// when norm_topk_prob (and more than one expert), times routed_scaling_factor. Every selection
// (the model's own, the router's device-limited one) weighs its experts with this.
std::vector<float> GateWeights(const model::ModelConfig& config, absl::Span<const float> scores,
                               absl::Span<const int32_t> experts);
// The same into `weights` [experts.size()].
void GateWeightsInto(const model::ModelConfig& config, absl::Span<const float> scores,
                     absl::Span<const int32_t> experts, float* weights);

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_ROUTING_H_
