// CPU kernels over weights held in their checkpoint dtype (BF16, FP8 E4M3 with 128x128 block
// scales; model::Matrix::narrow()). Activations and accumulation are fp32: each weight value is
// widened to fp32 as it is read (exactly the value the fp32 loader would have produced), so the
// results differ from the fp32 reference only by the order of the sums.
//
// - NarrowLinear at small M (decode: one row per sequence; BF16 up to 128 rows) streams the weight once, rows split
//   across the OpenMP threads, every row of x against each weight row while it is in registers:
//   memory-bound at the weight's bytes, which is what BF16/FP8 halve or quarter.
// - At larger M (prefill) each thread widens a panel of weight rows into fp32 once and runs an
//   sgemm of all of x against it, so the GEMM keeps its peak and the widening is amortised over
//   the M rows.
// AVX-512 where the CPU has it (checked once at run time), portable loops elsewhere. Stateless;
// any thread may call them (they use the OpenMP pool that oneDNN shares).
//
//   kernels::NarrowLinear(x, m, w, y);          // y[m, w.rows] = x[m, w.cols] @ w^T
//   kernels::GroupedLinear(tasks);              // many small products, one parallel region
//   kernels::WidenRows(w, row, 1, embedding);   // w[row, :] as fp32
#ifndef SPLITMOE_COMMON_KERNELS_CPU_NARROW_LINEAR_H_
#define SPLITMOE_COMMON_KERNELS_CPU_NARROW_LINEAR_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/model/tensor.h"

namespace splitmoe::kernels {

// out[nrows, w.cols] = w[row0 : row0 + nrows, :] as fp32. Any weight (fp32, bf16, fp8; not a
// packed one).
void WidenRows(const model::Matrix& w, int64_t row0, int64_t nrows, float* out);
// w's rows [row0, row0 + nrows) as fp32 [nrows, w.cols]: in place for an fp32 weight, else
// widened into the calling thread's buffer (grows, never shrinks), valid until that thread's
// next call. One head's slice of kv_b_proj, read by the thread that runs its GEMMs.
const float* WidenedRows(const model::Matrix& w, int64_t row0, int64_t nrows);

// y[m, w.rows] = x[m, w.cols] @ w^T for a narrow weight (w.narrow()). y is overwritten.
void NarrowLinear(const float* x, int64_t m, const model::Matrix& w, float* y);

// Rows of x up to which NarrowLinear streams the weight instead of widening panels (FP8; BF16
// streams up to kBf16StreamMaxRows), and up to which GroupedLinear runs a task.
inline constexpr int64_t kNarrowStreamMaxRows = 16;
inline constexpr int64_t kBf16StreamMaxRows = 128;

// One small product of a GroupedLinear batch, over the weight rows [row0, row0 + rows):
//   transposed == false: y[i, r] = x[i, 0 : w.cols] . w[row0 + r, :]          (y is m x rows)
//   transposed == true:  y[i, c] = sum_r x[i, r] * w[row0 + r, c]              (y is m x w.cols)
// x and y are row-major with leading dimensions ldx and ldy; y is overwritten.
struct LinearTask {
  const float* x = nullptr;
  int64_t ldx = 0;
  int64_t m = 0;
  const model::Matrix* w = nullptr;
  int64_t row0 = 0;
  int64_t rows = 0;
  bool transposed = false;
  float* y = nullptr;
  int64_t ldy = 0;
};

// Whether a product of `rows` rows of x with w runs as a GroupedLinear task: a narrow weight at
// decode sizes.
inline bool Grouped(const model::Matrix& w, int64_t rows) {
  return w.narrow() && rows <= kNarrowStreamMaxRows;
}
// The task y[m, w.rows] = x[m, w.cols] @ w^T over all of w.
inline LinearTask Task(const float* x, int64_t ldx, int64_t m, const model::Matrix& w, float* y,
                       int64_t ldy) {
  return {x, ldx, m, &w, 0, w.rows, false, y, ldy};
}

// Whether GroupedLinear runs this task: a narrow weight (BF16 or FP8), at most
// kNarrowStreamMaxRows rows of x, rows and strides within the weight and the buffers.
bool GroupedLinearSupports(const LinearTask& task);
absl::Status CheckGroupedLinear(absl::Span<const LinearTask> tasks);

// Every task in one parallel region, their weight bytes split evenly across the threads: a
// decode step's many small products (the selected experts' gate, up and down projections, the
// attention's per-head kv_b_proj slices) stream their weights at the memory's rate instead of
// paying a parallel region, and an idle thread, each. Validates first (CheckGroupedLinear).
absl::Status GroupedLinear(absl::Span<const LinearTask> tasks);

// Whether the AVX-512 kernels run on this CPU (else the portable loops).
bool NarrowKernelsUseAvx512();
// Tests: run the portable loops even where AVX-512 exists (false), or go back (true).
void SetNarrowKernelsAvx512ForTest(bool use);

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CPU_NARROW_LINEAR_H_
