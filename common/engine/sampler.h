// Token sampling and logprobs. Sampling is a pure function of (logits, params, position): the
// random number comes from a counter-based generator keyed by (seed, position), so a seeded
// request samples the same tokens on any process that computes the same logits — the cluster
// relies on this. Pure functions; any thread.
//
//   SamplingParams p{.temperature = 0.7, .top_p = 0.9, .seed = 42};
//   int32_t token = SampleToken(logits, p, /*position=*/prompt_len + i);
#ifndef SPLITMOE_COMMON_ENGINE_SAMPLER_H_
#define SPLITMOE_COMMON_ENGINE_SAMPLER_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace splitmoe::engine {

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy (argmax, ties to the lower id)
  double top_p = 1.0;        // (0, 1]
  int64_t top_k = 0;         // 0: no limit
  uint64_t seed = 0;
};

absl::Status ValidateSamplingParams(const SamplingParams& params);

// Uniform double in [0, 1) from (seed, position): SplitMix64 finalisers over both words.
double CounterUniform(uint64_t seed, uint64_t position);

int32_t SampleToken(absl::Span<const float> logits, const SamplingParams& params, int64_t position);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // descending logprob, ties to the lower id
};

// log_softmax of the raw logits (temperature does not apply), for `token` and the top k.
TokenLogprob ComputeLogprob(absl::Span<const float> logits, int32_t token, int64_t top_k);

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_SAMPLER_H_
