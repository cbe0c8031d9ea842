#include "common/kernels/cpu/narrow_linear.h"

// GCC 12 reports its own AVX-512 headers (_mm512_undefined_ps in the masked loads and
// reductions) as reading uninitialised values: a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/kernels/cpu/threads.h"
#include "common/model/numeric.h"

namespace splitmoe::kernels {
namespace {

using model::Matrix;
using model::WeightDType;

// The fp8 scale row of weight row r.
const float* ScaleRow(const Matrix& w, int64_t r) {
  return w.scale_inv.data() + (r / model::kFp8BlockSize) * w.scale_cols();
}

// ---- Portable: one value at a time, the loader's own conversions.

void WidenRowPortable(const Matrix& w, int64_t r, float* out) {
  const int64_t k = w.cols;
  if (w.dtype == WeightDType::kBFloat16) {
    const uint8_t* p = w.raw + r * k * 2;
    for (int64_t c = 0; c < k; ++c) {
      uint16_t bits;
      std::memcpy(&bits, p + 2 * c, 2);
      out[c] = model::Bf16ToFloat(bits);
    }
  } else {
    const uint8_t* p = w.raw + r * k;
    const float* s = ScaleRow(w, r);
    for (int64_t c = 0; c < k; ++c)
      out[c] = model::Fp8E4M3ToFloat(p[c]) * s[c / model::kFp8BlockSize];
  }
}

// ---- AVX-512: 16 values at a time.

#define SPLITMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

SPLITMOE_AVX512 inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

SPLITMOE_AVX512 inline __m512 LoadBf16(const uint8_t* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// E4M3 "fn" to fp32, exactly model::Fp8E4M3ToFloat: normals by moving the exponent and mantissa
// into place and rebiasing (7 -> 127), subnormals as mantissa * 2^-9 (no reliance on denormal
// arithmetic), 0x7f/0xff NaN.
SPLITMOE_AVX512 inline __m512 LoadFp8(const uint8_t* p, __mmask16 m) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  const __m512i normal =
      _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512.0f));
  __m512 v = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)),
                                  _mm512_castsi512_ps(normal), sub);
  v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)), v,
                           _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}

// 16 weight values of a row starting at column c, widened (and scaled: fp8).
template <WeightDType D>
SPLITMOE_AVX512 inline __m512 LoadW(const uint8_t* row, const float* srow, int64_t c,
                                    __mmask16 m) {
  if constexpr (D == WeightDType::kBFloat16) {
    return LoadBf16(row + 2 * c, m);
  } else {
    return _mm512_mul_ps(LoadFp8(row + c, m), _mm512_set1_ps(srow[c / model::kFp8BlockSize]));
  }
}

template <WeightDType D>
SPLITMOE_AVX512 void WidenRowAvx512(const Matrix& w, int64_t r, float* out) {
  const int64_t k = w.cols;
  const uint8_t* row = w.raw + r * k * model::WeightDTypeBytes(D);
  const float* srow = D == WeightDType::kFp8E4M3 ? ScaleRow(w, r) : nullptr;
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 m = TailMask(k - c);
    _mm512_mask_storeu_ps(out + c, m, LoadW<D>(row, srow, c, m));
  }
}

// y[i, r0 + j] = x[i, :] . w[r0 + j, :] for j < R, i < MB: R weight rows against MB rows of x,
// each weight value read once from memory and used MB times while in a register.
template <WeightDType D, int R, int MB>
SPLITMOE_AVX512 void StreamTile(const float* x, int64_t ldx, const Matrix& w, int64_t r0,
                                float* y, int64_t ldy) {
  const int64_t k = w.cols;
  const int64_t row_bytes = k * model::WeightDTypeBytes(D);
  const uint8_t* rows[R];
  const float* srows[R];
  for (int j = 0; j < R; ++j) {
    rows[j] = w.raw + (r0 + j) * row_bytes;
    srows[j] = D == WeightDType::kFp8E4M3 ? ScaleRow(w, r0 + j) : nullptr;
  }
  // Every loop over R and MB is unrolled so the accumulators live in registers.
  __m512 acc[R][MB];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_setzero_ps();
  const int64_t full = k / 16 * 16;
  for (int64_t c = 0; c < full; c += 16) {
    __m512 xv[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + c);
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const __m512 wv = LoadW<D>(rows[j], srows[j], c, static_cast<__mmask16>(0xffff));
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
  if (full < k) {
    const __mmask16 m = TailMask(k - full);
    __m512 xv[MB];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_ps(m, x + i * ldx + full);
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const __m512 wv = LoadW<D>(rows[j], srows[j], full, m);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) y[i * ldy + r0 + j] = _mm512_reduce_add_ps(acc[j][i]);
}

template <WeightDType D, int R>
SPLITMOE_AVX512 void StreamRows(const float* x, int64_t m, const Matrix& w, int64_t r0, float* y) {
  const int64_t k = w.cols, n = w.rows;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) StreamTile<D, R, 4>(x + i * k, k, w, r0, y + i * n, n);
  switch (m - i) {
    case 3:
      StreamTile<D, R, 3>(x + i * k, k, w, r0, y + i * n, n);
      break;
    case 2:
      StreamTile<D, R, 2>(x + i * k, k, w, r0, y + i * n, n);
      break;
    case 1:
      StreamTile<D, R, 1>(x + i * k, k, w, r0, y + i * n, n);
      break;
    default:
      break;
  }
}

constexpr int kStreamRows = 4;  // weight rows per tile: 4 x 4 accumulators at M >= 4

template <WeightDType D>
SPLITMOE_AVX512 void StreamLinearAvx512(const float* x, int64_t m, const Matrix& w, float* y) {
  const int64_t n = w.rows;
  const int64_t groups = (n + kStreamRows - 1) / kStreamRows;
  // Below ~64 KiB of weights the threads' start-up costs more than the stream.
#pragma omp parallel for schedule(static) if (n * w.cols >= (1 << 16))
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = g * kStreamRows;
    if (r0 + kStreamRows <= n) {
      StreamRows<D, kStreamRows>(x, m, w, r0, y);
    } else {
      for (int64_t r = r0; r < n; ++r) StreamRows<D, 1>(x, m, w, r, y);
    }
  }
}

bool DetectAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

}  // namespace

bool NarrowKernelsUseAvx512();

namespace {

void WidenRow(const Matrix& w, int64_t r, float* out) {
  if (NarrowKernelsUseAvx512()) {
    if (w.dtype == WeightDType::kBFloat16) {
      WidenRowAvx512<WeightDType::kBFloat16>(w, r, out);
    } else {
      WidenRowAvx512<WeightDType::kFp8E4M3>(w, r, out);
    }
  } else {
    WidenRowPortable(w, r, out);
  }
}

// A thread's scratch for widened weights; grows, never shrinks (fresh pages fault slowly).
std::vector<float>& Scratch() {
  thread_local std::vector<float> scratch;
  return scratch;
}

void StreamLinearPortable(const float* x, int64_t m, const Matrix& w, float* y) {
  const int64_t n = w.rows, k = w.cols;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 16))
  for (int64_t r = 0; r < n; ++r) {
    std::vector<float>& row = Scratch();
    if (static_cast<int64_t>(row.size()) < k) row.resize(static_cast<size_t>(k));
    WidenRowPortable(w, r, row.data());
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * k;
      float sum = 0.0f;
      for (int64_t c = 0; c < k; ++c) sum += xi[c] * row[c];
      y[i * n + r] = sum;
    }
  }
}

// Each thread widens panels of weight rows once and multiplies all of x against them.
void PanelLinear(const float* x, int64_t m, const Matrix& w, float* y) {
  const int64_t n = w.rows, k = w.cols;
  const int64_t threads = CpuThreads();
  // Panels of up to 256 rows, at least two per thread when the weight allows.
  int64_t rows_per_panel = std::min<int64_t>(256, (n + 2 * threads - 1) / (2 * threads));
  rows_per_panel = std::max<int64_t>(16, (rows_per_panel + 15) / 16 * 16);
  const int64_t panels = (n + rows_per_panel - 1) / rows_per_panel;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t r0 = p * rows_per_panel;
    const int64_t nr = std::min(rows_per_panel, n - r0);
    std::vector<float>& panel = Scratch();
    if (static_cast<int64_t>(panel.size()) < nr * k) panel.resize(static_cast<size_t>(nr * k));
    WidenRows(w, r0, nr, panel.data());
    // Inside the parallel region oneDNN runs the sgemm on this thread alone.
    (void)dnnl_sgemm('N', 'T', m, nr, k, 1.0f, x, k, panel.data(), k, 0.0f, y + r0, n);
  }
}

}  // namespace

std::atomic<bool>& UseAvx512() {
  static std::atomic<bool> use(DetectAvx512());
  return use;
}

bool NarrowKernelsUseAvx512() { return UseAvx512().load(std::memory_order_relaxed); }

void SetNarrowKernelsAvx512ForTest(bool use) { UseAvx512().store(use && DetectAvx512()); }

void WidenRows(const Matrix& w, int64_t row0, int64_t nrows, float* out) {
  if (!w.narrow()) {
    std::memcpy(out, w.data.data() + row0 * w.cols,
                static_cast<size_t>(nrows * w.cols) * sizeof(float));
    return;
  }
  for (int64_t r = 0; r < nrows; ++r) WidenRow(w, row0 + r, out + r * w.cols);
}

void NarrowLinear(const float* x, int64_t m, const Matrix& w, float* y) {
  if (m <= 0 || w.rows == 0) return;
  if (m > kNarrowStreamMaxRows) {
    PanelLinear(x, m, w, y);
  } else if (!NarrowKernelsUseAvx512()) {
    StreamLinearPortable(x, m, w, y);
  } else if (w.dtype == WeightDType::kBFloat16) {
    StreamLinearAvx512<WeightDType::kBFloat16>(x, m, w, y);
  } else {
    StreamLinearAvx512<WeightDType::kFp8E4M3>(x, m, w, y);
  }
}

}  // namespace splitmoe::kernels
