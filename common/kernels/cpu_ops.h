// fp32 CPU kernels of the engine: GEMMs through the BLAS (OpenBLAS), and the small
// element-wise ops (RMSNorm, SwiGLU, softmax, RoPE) written as plain loops that vectorise.
// Stateless functions; any thread may call them. Shapes are given in comments as [rows, cols],
// row-major.
//
//   // y[T, out] = x[T, in] @ W^T, W a Hugging Face linear weight [out, in]
//   kernels::Linear(x.data(), T, w, y.data());
#ifndef SPLITMOE_COMMON_KERNELS_CPU_OPS_H_
#define SPLITMOE_COMMON_KERNELS_CPU_OPS_H_

#include <cstdint>
#include <functional>

#include "common/model/tensor.h"

namespace splitmoe::kernels {

// y[m, w.rows] = x[m, w.cols] @ w^T (y is overwritten). Packed weights run through oneDNN,
// plain fp32 ones through OpenBLAS, BF16/FP8 ones through cpu/narrow_linear.h.
void Linear(const float* x, int64_t m, const model::Matrix& w, float* y);

// OpenBLAS and oneDNN (OpenMP) each keep a pool of spinning threads; on a small machine the two
// pools fight for the cores (measured: decode spent >30% in sched_yield). The engine runs its
// large GEMMs through oneDNN and gives OpenBLAS, which serves the per-sequence attention GEMMs,
// `threads` threads (1 by default from Engine::Load). Process-wide; call before serving.
void SetBlasThreads(int threads);

// body(i) for i in [0, n), spread over the CPU kernels' threads (the OpenMP pool oneDNN shares),
// one index at a time as threads come free; serially inside a parallel region. Kernels that
// body calls run on its thread alone, so it must call only thread-safe ones (the narrow-weight
// kernels and dnnl_sgemm are; a packed oneDNN primitive and OpenBLAS are not promised to be).
void ParallelFor(int64_t n, const std::function<void(int64_t)>& body);

// The same GEMM with oneDNN's sgemm on the calling thread (inside a parallel region it runs
// there alone; safe from several threads at once).
void SgemmOnThisThread(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc);

// General row-major GEMM: C[m, n] = alpha * op(A) @ op(B) + beta * C, with leading dimensions.
// OpenBLAS; inside a parallel region (ParallelFor) oneDNN's sgemm on the calling thread.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight, for r < rows. out may alias x.
void RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t x_stride, const float* weight,
             float eps, float* out, int64_t out_stride);

// gate[i] = silu(gate[i]) * up[i]
void SiluMul(float* gate, const float* up, int64_t n);

// In place over x[0..n): x = softmax(x). Entries equal to -inf get probability 0. The exp is
// vectorised (within 2 ulp of std::exp; 0 where x - max < -87), the sum taken in double.
void SoftmaxInPlace(float* x, int64_t n);
// Each row of x [rows, n] in place: SoftmaxInPlace, or the logistic sigmoid 1 / (1 + e^-x)
// (a MoE gate's scores under DeepSeek's scoring_func).
void ScoreRows(float* x, int64_t rows, int64_t n, bool sigmoid);
// Tests: out[i] = the softmax's e^x[i] for x[i] <= 0.
void ExpNonPositiveForTest(const float* x, int64_t n, float* out);

// Rotates consecutive pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i] (DeepSeek's
// interleaved "complex" RoPE). cos_sin holds [dim/2] (cos, sin) pairs for the position.
void ApplyRope(float* x, const float* cos_sin, int64_t dim);

// The dim/2 (cos, sin) pairs of `position`: angle = float(position) * inv_freq[i] in fp32 (as
// the reference's torch.outer), cos and sin in double, rounded to fp32.
void RopeCosSin(int64_t position, const float* inv_freq, int64_t dim, float* cos_sin);

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CPU_OPS_H_
