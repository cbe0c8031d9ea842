// RopeTable: the rotary frequencies of the decoupled RoPE key/query, with DeepSeek's YaRN
// frequency correction when the config extends the context. Immutable; any thread.
//
//   RopeTable rope(config);
//   std::vector<float> cs(rope.dim());   // dim/2 (cos, sin) pairs
//   rope.CosSin(position, cs.data());
//   kernels::ApplyRope(q_pe, cs.data(), rope.dim());
#ifndef SPLITMOE_COMMON_ENGINE_ROPE_H_
#define SPLITMOE_COMMON_ENGINE_ROPE_H_

#include <cstdint>
#include <vector>

#include "common/model/config.h"

namespace splitmoe::engine {

class RopeTable {
 public:
  explicit RopeTable(const model::ModelConfig& config);
  int64_t dim() const { return dim_; }
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  // Writes dim/2 (cos, sin) pairs for `position` into out[0..dim).
  void CosSin(int64_t position, float* out) const;

 private:
  int64_t dim_;
  std::vector<float> inv_freq_;  // [dim / 2]
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_ROPE_H_
