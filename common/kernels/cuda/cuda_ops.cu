#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/kernels/cuda/cuda_ops.h"

namespace splitmoe::kernels::cuda {
namespace {

absl::Status CudaError(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

// One block per row; the sum of squares in fp32 through shared memory.
__global__ void RmsNormKernel(const float* x, int64_t dim, const float* weight, float eps,
                              float* out) {
  extern __shared__ float partial[];
  const float* xr = x + blockIdx.x * dim;
  float* o = out + blockIdx.x * dim;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i] * xr[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const float inv = rsqrtf(partial[0] / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv * weight[i];
}

}  // namespace

absl::StatusOr<int> DeviceCount() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) return 0;
  if (err != cudaSuccess) return CudaError(err, "cudaGetDeviceCount");
  return count;
}

absl::StatusOr<std::string> DeviceName(int index) {
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, index);
  if (err != cudaSuccess) return CudaError(err, "cudaGetDeviceProperties");
  return absl::StrCat(prop.name, ", sm_", prop.major, prop.minor, ", ", prop.totalGlobalMem >> 30,
                      " GiB");
}

absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps,
                     float* out) {
  if (rows < 0 || dim <= 0)
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: bad shape [", rows, ", ", dim, "]"));
  if (rows == 0) return absl::OkStatus();
  const size_t bytes = static_cast<size_t>(rows * dim) * sizeof(float);
  float *dx = nullptr, *dw = nullptr, *dout = nullptr;
  absl::Status status = CudaError(cudaMalloc(&dx, bytes), "cudaMalloc");
  if (status.ok()) status = CudaError(cudaMalloc(&dw, dim * sizeof(float)), "cudaMalloc");
  if (status.ok()) status = CudaError(cudaMalloc(&dout, bytes), "cudaMalloc");
  if (status.ok())
    status = CudaError(cudaMemcpy(dx, x, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  if (status.ok())
    status = CudaError(cudaMemcpy(dw, weight, dim * sizeof(float), cudaMemcpyHostToDevice),
                       "cudaMemcpy");
  if (status.ok()) {
    constexpr int kThreads = 256;
    RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, kThreads * sizeof(float)>>>(dx, dim, dw,
                                                                                       eps, dout);
    status = CudaError(cudaGetLastError(), "RmsNormKernel launch");
  }
  if (status.ok())
    status = CudaError(cudaMemcpy(out, dout, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(dx);
  cudaFree(dw);
  cudaFree(dout);
  return status;
}

}  // namespace splitmoe::kernels::cuda
