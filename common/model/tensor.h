// Matrix: one weight of the model, row-major, the one weight container of every backend.
// A Hugging Face linear weight [out_features, in_features] is stored as-is (rows = out), so
// y = x @ W^T is a GEMM with W transposed.
//
// A weight is held in one of three ways:
//   - fp32 values in `data` (an F32/F16 checkpoint, or any checkpoint loaded with
//     ResidentDType::kFloat32, the fp32 reference mode);
//   - packed once for oneDNN (engine::PackForInference; fp32 only), `data` then released;
//   - in its checkpoint dtype, BF16 or FP8 E4M3 with one fp32 scale per 128x128 block,
//     read in place from the memory-mapped checkpoint (`raw`, kept mapped by `keep`): the
//     resident bytes are the checkpoint's bytes. Kernels widen to fp32 as they read (exact:
//     bf16 -> fp32 is a shift; an E4M3 value times its fp32 scale is the same fp32 product the
//     loader's dequantisation computes), so every backend computes in fp32 from them.
#ifndef SPLITMOE_COMMON_MODEL_TENSOR_H_
#define SPLITMOE_COMMON_MODEL_TENSOR_H_

#include <cstdint>
#include <memory>
#include <vector>

namespace splitmoe::kernels {
class PackedLinear;
}  // namespace splitmoe::kernels

namespace splitmoe::model {

enum class WeightDType : uint8_t { kFloat32, kBFloat16, kFp8E4M3 };
const char* WeightDTypeName(WeightDType dtype);  // "fp32", "bf16", "fp8_e4m3"
constexpr int64_t WeightDTypeBytes(WeightDType dtype) {
  return dtype == WeightDType::kFloat32 ? 4 : dtype == WeightDType::kBFloat16 ? 2 : 1;
}

// FP8 checkpoints carry one fp32 scale per kFp8BlockSize x kFp8BlockSize block of a weight.
inline constexpr int64_t kFp8BlockSize = 128;

struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;                                        // fp32, rows * cols
  std::shared_ptr<const kernels::PackedLinear> packed = nullptr;  // shared, immutable
  uint64_t packed_bytes = 0;
  // Checkpoint-dtype weights (dtype != kFloat32): rows * cols values at `raw`, possibly
  // unaligned, little-endian as in safetensors.
  WeightDType dtype = WeightDType::kFloat32;
  const uint8_t* raw = nullptr;
  std::shared_ptr<const void> keep;  // keeps `raw` valid (the mapped file, or an owned copy)
  std::vector<float> scale_inv;      // fp8: [scale_rows(), scale_cols()], multiplies the values

  bool empty() const { return data.empty() && packed == nullptr && raw == nullptr; }
  bool narrow() const { return raw != nullptr; }  // held in a checkpoint dtype
  float* row(int64_t r) { return data.data() + r * cols; }
  const float* row(int64_t r) const { return data.data() + r * cols; }
  int64_t scale_rows() const { return (rows + kFp8BlockSize - 1) / kFp8BlockSize; }
  int64_t scale_cols() const { return (cols + kFp8BlockSize - 1) / kFp8BlockSize; }
  // Resident bytes: the values however held, plus scales.
  uint64_t bytes() const {
    uint64_t b = data.size() * sizeof(float) + packed_bytes + scale_inv.size() * sizeof(float);
    if (raw != nullptr) b += static_cast<uint64_t>(rows * cols * WeightDTypeBytes(dtype));
    return b;
  }
};

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_TENSOR_H_
