#include "common/engine/rope.h"

#include "common/kernels/cpu_ops.h"

#include <algorithm>
#include <cmath>

namespace splitmoe::engine {
namespace {

constexpr double kPi = 3.14159265358979323846;

// The dimension index whose wavelength completes `rotations` turns over `max_len` positions.
double CorrectionDim(double rotations, int64_t dim, double base, int64_t max_len) {
  return static_cast<double>(dim) * std::log(static_cast<double>(max_len) / (rotations * 2 * kPi)) /
         (2 * std::log(base));
}

}  // namespace

RopeTable::RopeTable(const model::ModelConfig& config) : dim_(config.qk_rope_head_dim) {
  const int64_t half = dim_ / 2;
  inv_freq_.resize(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // As the reference: exponent computed in fp32, the frequency rounded to fp32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim_);
    inv_freq_[static_cast<size_t>(i)] =
        static_cast<float>(1.0 / std::pow(config.rope_theta, static_cast<double>(exponent)));
  }
  const model::YarnScaling& y = config.yarn;
  if (y.enabled) {
    double low = std::floor(
        CorrectionDim(y.beta_fast, dim_, config.rope_theta, y.original_max_position_embeddings));
    double high = std::ceil(
        CorrectionDim(y.beta_slow, dim_, config.rope_theta, y.original_max_position_embeddings));
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim_ - 1));
    if (low == high) high += 0.001;
    const float flow = static_cast<float>(low), fhigh = static_cast<float>(high);
    const float factor = static_cast<float>(y.factor);
    for (int64_t i = 0; i < half; ++i) {
      float ramp = (static_cast<float>(i) - flow) / (fhigh - flow);
      ramp = std::clamp(ramp, 0.0f, 1.0f);
      const float smooth = 1.0f - ramp;
      const float f = inv_freq_[static_cast<size_t>(i)];
      inv_freq_[static_cast<size_t>(i)] = f / factor * (1.0f - smooth) + f * smooth;
    }
  }
}

void RopeTable::CosSin(int64_t position, float* out) const {
  kernels::RopeCosSin(position, inv_freq_.data(), dim_, out);
}

}  // namespace splitmoe::engine
