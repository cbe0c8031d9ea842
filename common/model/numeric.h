// Scalar conversions between fp32 and the storage dtypes of DeepSeek checkpoints (BF16, F16,
// FP8 E4M3 "fn": no infinities, 0x7f/0xff are NaN, max 448). Pure functions, any thread.
//
//   float w = Bf16ToFloat(bits);
//   uint8_t q = FloatToFp8E4M3(w / scale);   // round to nearest even, saturating at +-448
#ifndef SPLITMOE_COMMON_MODEL_NUMERIC_H_
#define SPLITMOE_COMMON_MODEL_NUMERIC_H_

#include <cstdint>
#include <cstring>

#include "absl/types/span.h"
#include "common/model/safetensors.h"
#include "common/model/tensor.h"

namespace splitmoe::model {

inline float Bf16ToFloat(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float F16ToFloat(uint16_t bits);
float Fp8E4M3ToFloat(uint8_t bits);
uint8_t FloatToFp8E4M3(float f);
constexpr float kFp8E4M3Max = 448.0f;

// Converts `count` elements of `dtype` at `src` (unaligned bytes) to fp32 at `dst`.
// Only the floating dtypes are accepted; callers check the dtype first.
void ConvertToFloat(DType dtype, const uint8_t* src, int64_t count, float* dst);

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_NUMERIC_H_
