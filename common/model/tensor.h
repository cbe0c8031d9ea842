// Matrix: a dense row-major fp32 matrix, the one weight container of the CPU engine.
// A Hugging Face linear weight [out_features, in_features] is stored as-is (rows = out), so
// y = x @ W^T is a GEMM with W transposed. A weight used only through kernels::Linear may be
// packed once for oneDNN (engine::PackForInference); its plain `data` is then released.
#ifndef SPLITMOE_COMMON_MODEL_TENSOR_H_
#define SPLITMOE_COMMON_MODEL_TENSOR_H_

#include <cstdint>
#include <memory>
#include <vector>

namespace splitmoe::kernels {
class PackedLinear;
}  // namespace splitmoe::kernels

namespace splitmoe::model {

struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;                              // rows * cols; empty once packed
  std::shared_ptr<const kernels::PackedLinear> packed = nullptr;  // shared, immutable
  uint64_t packed_bytes = 0;

  bool empty() const { return data.empty() && packed == nullptr; }
  float* row(int64_t r) { return data.data() + r * cols; }
  const float* row(int64_t r) const { return data.data() + r * cols; }
  uint64_t bytes() const { return data.size() * sizeof(float) + packed_bytes; }
};

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_TENSOR_H_
