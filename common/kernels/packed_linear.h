// PackedLinear: y = x @ W^T through oneDNN's fp32 matmul, with W reordered once into the layout
// oneDNN prefers and one primitive per weight whose row count M is a runtime argument. On this
// machine it beats OpenBLAS on the engine's shapes (bench/blas_choice_bench.cc: 1.4-1.6x on
// prefill GEMMs, up to 6x at M = 8; equal on the memory-bound output layer), so the engine packs
// every weight it only uses through kernels::Linear. Immutable after Create; Run may be called
// from any thread (oneDNN primitives are thread-safe to execute; each thread has its stream).
//
//   auto packed = PackedLinear::Create(w);        // w: [out, in] fp32
//   packed->Run(x, /*m=*/17, y);                  // y[17, out] = x[17, in] @ w^T
#ifndef SPLITMOE_COMMON_KERNELS_PACKED_LINEAR_H_
#define SPLITMOE_COMMON_KERNELS_PACKED_LINEAR_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "common/model/tensor.h"

namespace splitmoe::kernels {

class PackedLinear {
 public:
  static absl::StatusOr<std::shared_ptr<const PackedLinear>> Create(const model::Matrix& w);
  ~PackedLinear();
  void Run(const float* x, int64_t m, float* y) const;
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  uint64_t bytes() const { return bytes_; }

 private:
  struct Impl;
  PackedLinear() = default;
  std::unique_ptr<Impl> impl_;
  int64_t rows_ = 0, cols_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_PACKED_LINEAR_H_
