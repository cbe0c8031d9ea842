#include "common/kernels/cpu_ops.h"

#include <cblas.h>
#include <oneapi/dnnl/dnnl.h>

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

void SiluMul(float* gate, const float* up, int64_t n) {
  // Element by element, so splitting it across threads changes no result.
#pragma omp parallel for schedule(static) if (n >= (1 << 16) && !CpuInParallel())
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void SoftmaxInPlace(float* x, int64_t n) {
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
