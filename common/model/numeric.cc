#include "common/model/numeric.h"

#include <array>
#include <cmath>
#include <limits>

namespace splitmoe::model {
namespace {

std::array<float, 256> MakeFp8Table() {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b) {
    int sign = (b >> 7) & 1;
    int exponent = (b >> 3) & 0xf;
    int mantissa = b & 0x7;
    float value;
    if (exponent == 0xf && mantissa == 0x7) {
      value = std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {
      value = std::ldexp(static_cast<float>(mantissa) / 8.0f, -6);
    } else {
      value = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
    }
    table[b] = sign ? -value : value;
  }
  return table;
}

const std::array<float, 256>& Fp8Table() {
  static const std::array<float, 256> table = MakeFp8Table();
  return table;
}

}  // namespace

float F16ToFloat(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float value;
  if (exponent == 0) {
    value = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    value =
        mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    value =
        std::ldexp(1.0f + static_cast<float>(mantissa) / 1024.0f, static_cast<int>(exponent) - 15);
  }
  return sign ? -value : value;
}

float Fp8E4M3ToFloat(uint8_t bits) { return Fp8Table()[bits]; }

const char* WeightDTypeName(WeightDType dtype) {
  switch (dtype) {
    case WeightDType::kFloat32:
      return "fp32";
    case WeightDType::kBFloat16:
      return "bf16";
    case WeightDType::kFp8E4M3:
      return "fp8_e4m3";
  }
  return "?";
}

uint8_t FloatToFp8E4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= kFp8E4M3Max) return sign | 0x7e;  // saturate: 448
  // Exhaustive nearest search over the 127 non-negative finite codes, ties to the even code.
  // Encoding happens once per weight when a checkpoint is written, never on a hot path.
  const auto& table = Fp8Table();
  int best = 0;
  float best_err = a;
  for (int code = 1; code <= 0x7e; ++code) {
    float err = std::fabs(table[code] - a);
    if (err < best_err || (err == best_err && (code & 1) == 0)) {
      best = code;
      best_err = err;
    }
  }
  return sign | static_cast<uint8_t>(best);
}

void ConvertToFloat(DType dtype, const uint8_t* src, int64_t count, float* dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(count) * 4);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < count; ++i) {
        uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        dst[i] = Bf16ToFloat(b);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < count; ++i) {
        uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        dst[i] = F16ToFloat(b);
      }
      return;
    case DType::kF8E4M3: {
      const auto& table = Fp8Table();
      for (int64_t i = 0; i < count; ++i) dst[i] = table[src[i]];
      return;
    }
    default:
      for (int64_t i = 0; i < count; ++i) dst[i] = std::numeric_limits<float>::quiet_NaN();
      return;
  }
}

}  // namespace splitmoe::model
