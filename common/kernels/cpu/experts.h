// Routed experts on the CPU: each expert, a SwiGLU MLP (down(silu(gate x) * up x)), run over the
// rows of x routed to it, its output added with the rows' gate weights. The single-process
// engine's MoE executor and the expert services' shards both compute through
// AccumulateExperts (through kernels::RoutedExperts, kernels/ops.h, where the choice comes as
// [tokens, top_k] slots).
//
//   std::vector<kernels::ExpertRows> selected = {{&expert, rows, weights}, ...};
//   SPLITMOE_RETURN_IF_ERROR(kernels::AccumulateExperts(selected, x, hidden, out));
#ifndef SPLITMOE_COMMON_KERNELS_CPU_EXPERTS_H_
#define SPLITMOE_COMMON_KERNELS_CPU_EXPERTS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/model/weights.h"

namespace splitmoe::kernels {

// Runs `expert` on `rows` rows of x and adds weight[r] * expert(x[r]) to out[index[r]].
void AccumulateExpert(const model::MlpWeights& expert, const float* x, int64_t hidden,
                      absl::Span<const int32_t> rows, absl::Span<const float> weight, float* out);

// One expert's share of a MoE layer: the rows of x routed to it and their gate weights.
struct ExpertRows {
  const model::MlpWeights* expert = nullptr;
  absl::Span<const int32_t> rows;
  absl::Span<const float> weight;
};

// AccumulateExpert for every expert of a layer. Where every expert holds narrow (BF16/FP8)
// weights and none has more than kNarrowStreamMaxRows rows (decode), all their gate and up
// projections run as one GroupedLinear, then all their down projections as another: two
// parallel regions for the layer instead of three per expert. Narrow weights with more rows and
// experts enough for every thread (prefill) run side by side, one expert per thread, in waves
// of bounded output. Otherwise one expert at a time over all the threads. Every path adds the
// experts' outputs in the order given, so the results are the same sums.
absl::Status AccumulateExperts(absl::Span<const ExpertRows> experts, const float* x,
                               int64_t hidden, float* out);

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CPU_EXPERTS_H_
