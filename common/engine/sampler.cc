#include "common/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/base/mix64.h"

namespace splitmoe::engine {
namespace {

int32_t Argmax(absl::Span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

// Ids ordered by descending value, ties to the lower id; only the first `k` are ordered.
std::vector<int32_t> TopIds(absl::Span<const float> values, int64_t k) {
  std::vector<int32_t> ids(values.size());
  std::iota(ids.begin(), ids.end(), 0);
  k = std::min<int64_t>(k, static_cast<int64_t>(ids.size()));
  auto cmp = [&](int32_t a, int32_t b) {
    return values[a] != values[b] ? values[a] > values[b] : a < b;
  };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), cmp);
  ids.resize(static_cast<size_t>(k));
  return ids;
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", p.temperature));
  }
  if (!(p.top_p > 0.0 && p.top_p <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (p.top_k < 0)
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  return absl::OkStatus();
}

double CounterUniform(uint64_t seed, uint64_t position) {
  uint64_t h = Mix64(seed + 0x9e3779b97f4a7c15ULL);
  h = Mix64(h ^ (position * 0xd1b54a32d192ed03ULL + 0x632be59bd9b4e019ULL));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

int32_t SampleToken(absl::Span<const float> logits, const SamplingParams& p, int64_t position) {
  if (p.temperature == 0.0 || p.top_k == 1) return Argmax(logits);
  const int64_t vocab = static_cast<int64_t>(logits.size());
  const int64_t k = p.top_k > 0 ? std::min(p.top_k, vocab) : vocab;
  // Candidates in descending order (needed for top-k/top-p; cheap enough at vocab scale).
  std::vector<int32_t> ids = TopIds(logits, (k < vocab || p.top_p < 1.0) ? k : 0);
  if (ids.empty()) {  // no truncation: keep id order, no sort
    ids.resize(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
  }
  const double max_logit = logits[Argmax(logits)];
  std::vector<double> probs(ids.size());
  double sum = 0.0;
  for (size_t i = 0; i < ids.size(); ++i) {
    probs[i] = std::exp((static_cast<double>(logits[ids[i]]) - max_logit) / p.temperature);
    sum += probs[i];
  }
  size_t keep = ids.size();
  if (p.top_p < 1.0) {
    double cumulative = 0.0;
    for (size_t i = 0; i < ids.size(); ++i) {
      cumulative += probs[i] / sum;
      if (cumulative >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
    sum = 0.0;
    for (size_t i = 0; i < keep; ++i) sum += probs[i];
  }
  const double u = CounterUniform(p.seed, static_cast<uint64_t>(position)) * sum;
  double cumulative = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    cumulative += probs[i];
    if (u < cumulative) return ids[i];
  }
  return ids[keep - 1];
}

TokenLogprob ComputeLogprob(absl::Span<const float> logits, int32_t token, int64_t top_k) {
  double max_logit = logits[Argmax(logits)];
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - max_logit);
  const double log_z = max_logit + std::log(sum);
  TokenLogprob out;
  out.token = token;
  out.logprob = static_cast<float>(logits[token] - log_z);
  if (top_k > 0) {
    for (int32_t id : TopIds(logits, top_k)) {
      out.top.emplace_back(id, static_cast<float>(logits[id] - log_z));
    }
  }
  return out;
}

}  // namespace splitmoe::engine
