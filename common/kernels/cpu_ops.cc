#include "common/kernels/cpu_ops.h"

#include <cblas.h>
#include <oneapi/dnnl/dnnl.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cpu/threads.h"
#include "common/kernels/packed_linear.h"

namespace splitmoe::kernels {

void SetBlasThreads(int threads) { openblas_set_num_threads(threads); }

void SgemmOnThisThread(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc) {
  if (dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c,
                 ldc) == dnnl_success) {
    return;
  }
  // oneDNN refused (arguments it does not take, or no memory for its scratch): the same product
  // by definition, slowly, rather than leaving c unwritten.
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t p = 0; p < k; ++p) {
        sum += (trans_a ? a[p * lda + i] : a[i * lda + p]) * (trans_b ? b[j * ldb + p] : b[p * ldb + j]);
      }
      c[i * ldc + j] = alpha * sum + (beta == 0.0f ? 0.0f : beta * c[i * ldc + j]);
    }
  }
}

void ParallelFor(int64_t n, const std::function<void(int64_t)>& body) {
#pragma omp parallel for schedule(dynamic, 1) if (n > 1 && !CpuInParallel())
  for (int64_t i = 0; i < n; ++i) body(i);
}

void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  if (CpuInParallel()) {
    // On one thread of a parallel region (ParallelFor): oneDNN's sgemm, which runs on the
    // calling thread there and is safe to call from several at once.
    SgemmOnThisThread(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m), static_cast<blasint>(n),
              static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda), b,
              static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

void Linear(const float* x, int64_t m, const model::Matrix& w, float* y) {
  if (w.packed != nullptr) {
    w.packed->Run(x, m, y);
    return;
  }
  if (w.narrow()) {
    NarrowLinear(x, m, w, y);
    return;
  }
  const float beta = 0.0f;
  if (m == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(w.rows),
                static_cast<blasint>(w.cols), 1.0f, w.data.data(), static_cast<blasint>(w.cols), x,
                1, beta, y, 1);
    return;
  }
  Gemm(false, true, m, w.rows, w.cols, 1.0f, x, w.cols, w.data.data(), w.cols, beta, y, w.rows);
}

void RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t x_stride, const float* weight,
             float eps, float* out, int64_t out_stride) {
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16) && !CpuInParallel())
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    float* o = out + r * out_stride;
    double sum = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(dim) + eps));
    for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv * weight[i];
  }
}

namespace {

#ifdef __AVX2__
// e^x, 8 lanes at a time, for the softmax's shifted scores (x <= 0): Cephes' expf (x = n ln 2 +
// r with ln 2 in two parts, e^r by a degree-7 polynomial, 2^n into the exponent), within 2 ulp
// of std::exp (cpu_kernels_test checks); PyTorch's CPU softmax likewise uses a vectorised exp.
// x < -87 (e^x < 1.7e-38, where 2^n would leave the normal range) gives 0, -inf included; NaN
// stays NaN.
inline __m256 ExpNonPositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(lowest, x);  // NaN x: x
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(two_n)));
}

// Lanes [0, left) of 8.
inline __m256i LaneMask(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

}  // namespace

void SiluMul(float* gate, const float* up, int64_t n) {
  // Element by element, so splitting it across threads changes no result.
#ifdef __AVX2__
  // silu(g) = g * sigmoid(g), sigmoid(g) = (g < 0 ? e : 1) / (1 + e) with e = e^-|g| (the
  // vectorised exp of a non-positive value): the same function as g / (1 + e^-g), computed
  // without overflow, 8 lanes at a time (a serial libm exp took ~3% of a 512-token prefill).
  // Infinities and NaN give what the scalar form gives.
  const int64_t blocks = (n + 7) / 8;
#pragma omp parallel for schedule(static) if (n >= (1 << 16) && !CpuInParallel())
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i m = LaneMask(n - b * 8);
    const __m256 g = _mm256_maskload_ps(gate + b * 8, m);
    const __m256 u = _mm256_maskload_ps(up + b * 8, m);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 e = ExpNonPositive(_mm256_or_ps(g, _mm256_set1_ps(-0.0f)));  // e^-|g|
    const __m256 num = _mm256_blendv_ps(one, e, g);  // by g's sign bit
    const __m256 silu = _mm256_div_ps(_mm256_mul_ps(g, num), _mm256_add_ps(one, e));
    _mm256_maskstore_ps(gate + b * 8, m, _mm256_mul_ps(silu, u));
  }
#else
#pragma omp parallel for schedule(static) if (n >= (1 << 16) && !CpuInParallel())
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
#endif
}

void ExpNonPositiveForTest(const float* x, int64_t n, float* out) {
#ifdef __AVX2__
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i m = LaneMask(n - i);
    _mm256_maskstore_ps(out + i, m, ExpNonPositive(_mm256_maskload_ps(x + i, m)));
  }
#else
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(x[i]);
#endif
}

void ScoreRows(float* x, int64_t rows, int64_t n, bool sigmoid) {
  for (int64_t t = 0; t < rows; ++t) {
    float* s = x + t * n;
    if (!sigmoid) {
      SoftmaxInPlace(s, n);
    } else {
      for (int64_t e = 0; e < n; ++e) s[e] = 1.0f / (1.0f + std::exp(-s[e]));
    }
  }
}

void SoftmaxInPlace(float* x, int64_t n) {
#ifdef __AVX2__
  // The max (NaNs skipped, as x > max ? x : max does), then e^(x - max) summed in double, 8
  // lanes at a time: a serial libm exp and double sum took 7% of a 512-token prefill.
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i m = LaneMask(n - i);
    const __m256 v = _mm256_maskload_ps(x + i, m);
    vmax = _mm256_blendv_ps(vmax, _mm256_max_ps(v, vmax), _mm256_castsi256_ps(m));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float max = lanes[0];
  for (int j = 1; j < 8; ++j) max = lanes[j] > max ? lanes[j] : max;
  if (!std::isfinite(max)) {
    for (int64_t i = 0; i < n; ++i) x[i] = 0.0f;
    return;
  }
  const __m256 shift = _mm256_set1_ps(max);
  __m256d sum_lo = _mm256_setzero_pd(), sum_hi = _mm256_setzero_pd();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i m = LaneMask(n - i);
    const __m256 e = _mm256_and_ps(
        ExpNonPositive(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), shift)), _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(x + i, m, e);
    sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double parts[4];
  _mm256_store_pd(parts, _mm256_add_pd(sum_lo, sum_hi));
  const double sum = (parts[0] + parts[1]) + (parts[2] + parts[3]);
#else
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max = x[i] > max ? x[i] : max;
  if (!std::isfinite(max)) {
    for (int64_t i = 0; i < n; ++i) x[i] = 0.0f;
    return;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
#endif
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void RopeCosSin(int64_t position, const float* inv_freq, int64_t dim, float* cos_sin) {
  const float t = static_cast<float>(position);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float angle = t * inv_freq[i];  // fp32 like torch.outer in the reference
    cos_sin[2 * i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    cos_sin[2 * i + 1] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

void ApplyRope(float* x, const float* cos_sin, int64_t dim) {
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = a * s + b * c;
  }
}

}  // namespace splitmoe::kernels
