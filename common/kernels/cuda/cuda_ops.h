// The CUDA backend of the engine's kernels. Built only where CMake finds a CUDA toolkit; the CPU
// build never includes this header. This stage carries the backend's scaffolding — device
// discovery and the first element-wise op, checked against the CPU kernel by
// tests/kernels/cuda_ops_test.cc on a machine with a GPU — so the CUDA build path is exercised
// from the start. Host entry points check their arguments and return a Status; they never abort.
//
//   SPLITMOE_ASSIGN_OR_RETURN(int devices, kernels::cuda::DeviceCount());
//   SPLITMOE_RETURN_IF_ERROR(kernels::cuda::RmsNorm(x, rows, dim, weight, eps, out));  // host
//   memory
#ifndef SPLITMOE_COMMON_KERNELS_CUDA_CUDA_OPS_H_
#define SPLITMOE_COMMON_KERNELS_CUDA_CUDA_OPS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitmoe::kernels::cuda {

// Number of visible CUDA devices; 0 (not an error) when the driver finds none.
absl::StatusOr<int> DeviceCount();
// "NVIDIA H200, sm_90, 139 GiB" for device `index`.
absl::StatusOr<std::string> DeviceName(int index);

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight, rows x dim fp32, host pointers
// (copied to and from the current device). Same contract as kernels::RmsNorm.
absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps,
                     float* out);

}  // namespace splitmoe::kernels::cuda

#endif  // SPLITMOE_COMMON_KERNELS_CUDA_CUDA_OPS_H_
