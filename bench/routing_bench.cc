// Routing decisions per second on one core at DeepSeek-V3's shape (256 routed experts, 8 groups,
// top-8, 4 groups kept, sigmoid scores with a selection bias), beside a plain top-8 of 256:
//   BM_PlainTopK          partial sort of the biased scores (no groups, no weights)
//   BM_SelectExperts      the model's own selection (engine::SelectExperts: groups by top-2 sum,
//                         bias for selection only, normalised gate weights)
//   BM_SelectExpertsInto  the same into the caller's arrays (no allocation), as hot loops call it
//   BM_DeviceLimited/M    routing::DeviceLimitedTopK over 8 devices (one group each), M devices
//   BM_PlanDispatch/M     a whole 128-token batch planned onto 8 shards (what a worker does per
//                         MoE layer), M = 0: unlimited
// items/s = token decisions per second.
//
//   build/bench/routing_bench [--benchmark_filter=...]
#include <algorithm>
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "common/engine/routing.h"
#include "common/routing/expert_routing.h"
#include "common/routing/moe_plan.h"

namespace splitmoe {
namespace {

constexpr int kExperts = 256;
constexpr int kTokens = 1024;

model::ModelConfig V3() {
  model::ModelConfig c;
  c.n_routed_experts = kExperts;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.topk_method = model::TopkMethod::kNoauxTc;
  c.scoring_func = model::ScoringFunc::kSigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  return c;
}

struct Inputs {
  std::vector<float> scores;  // [kTokens, kExperts]
  std::vector<float> bias;    // [kExperts]
  Inputs() {
    std::mt19937 rng(7);
    std::normal_distribution<float> g(0.0f, 1.0f);
    scores.resize(static_cast<size_t>(kTokens) * kExperts);
    for (float& s : scores) s = 1.0f / (1.0f + std::exp(-g(rng)));
    bias.resize(kExperts);
    for (float& b : bias) b = 0.01f * g(rng);
  }
  absl::Span<const float> Row(int t) const {
    return absl::MakeConstSpan(scores).subspan(static_cast<size_t>(t) * kExperts, kExperts);
  }
};

const Inputs& In() {
  static const Inputs* in = new Inputs();
  return *in;
}

void BM_PlainTopK(benchmark::State& state) {
  const Inputs& in = In();
  std::vector<int32_t> idx(kExperts);
  std::vector<float> biased(kExperts);
  int t = 0;
  for (auto _ : state) {
    absl::Span<const float> row = in.Row(t);
    for (int e = 0; e < kExperts; ++e) biased[e] = row[e] + in.bias[e];
    for (int e = 0; e < kExperts; ++e) idx[e] = e;
    std::partial_sort(idx.begin(), idx.begin() + 8, idx.end(),
                      [&](int32_t a, int32_t b) { return biased[a] > biased[b]; });
    benchmark::DoNotOptimize(idx.data());
    t = (t + 1) % kTokens;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_PlainTopK);

void BM_SelectExperts(benchmark::State& state) {
  const Inputs& in = In();
  const model::ModelConfig c = V3();
  int t = 0;
  for (auto _ : state) {
    engine::ExpertChoice choice = engine::SelectExperts(c, in.Row(t), in.bias);
    benchmark::DoNotOptimize(choice.experts.data());
    t = (t + 1) % kTokens;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SelectExperts);

// The same selection into the caller's arrays (what PlanDispatch and the engine call per token).
void BM_SelectExpertsInto(benchmark::State& state) {
  const Inputs& in = In();
  const model::ModelConfig c = V3();
  int32_t experts[8];
  float weights[8];
  int t = 0;
  for (auto _ : state) {
    engine::SelectExpertsInto(c, in.Row(t), in.bias, experts, weights);
    benchmark::DoNotOptimize(experts);
    benchmark::DoNotOptimize(weights);
    t = (t + 1) % kTokens;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SelectExpertsInto);

void BM_DeviceLimited(benchmark::State& state) {
  const Inputs& in = In();
  const model::ModelConfig c = V3();
  absl::StatusOr<routing::ExpertPlacement> p = routing::ExpertPlacement::Contiguous(kExperts, 8);
  const auto m = static_cast<int32_t>(state.range(0));
  int t = 0;
  for (auto _ : state) {
    absl::StatusOr<engine::ExpertChoice> choice =
        routing::DeviceLimitedTopK(c, in.Row(t), in.bias, *p, m);
    benchmark::DoNotOptimize(choice->experts.data());
    t = (t + 1) % kTokens;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_DeviceLimited)->Arg(2)->Arg(4);

void BM_PlanDispatch(benchmark::State& state) {
  const Inputs& in = In();
  const model::ModelConfig c = V3();
  std::vector<int32_t> expert_to_shard(kExperts);
  for (int e = 0; e < kExperts; ++e) expert_to_shard[e] = e / (kExperts / 8);
  const auto m = static_cast<int32_t>(state.range(0));
  constexpr int kBatch = 128;
  absl::Span<const float> scores = absl::MakeConstSpan(in.scores).subspan(0, kBatch * kExperts);
  for (auto _ : state) {
    auto plan = routing::PlanDispatch(c, scores, kBatch, in.bias, expert_to_shard, 8, m);
    benchmark::DoNotOptimize(plan->data());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_PlanDispatch)->Arg(0)->Arg(4);

}  // namespace
}  // namespace splitmoe

BENCHMARK_MAIN();
