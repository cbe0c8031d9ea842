#include "common/kernels/cuda/ops_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "common/kernels/cuda/cuda_ops.h"
#include "common/kernels/ops.h"

namespace splitmoe::kernels {
namespace {

cudaStream_t StreamOf(const Device& d) { return static_cast<cudaStream_t>(d.stream); }

absl::Status SupportsLinear(const Device& device, const LinearParams& p) {
  const std::string where = absl::StrCat("Linear on ", DeviceName(device), ": ");
  if (p.w_device == nullptr) return absl::InvalidArgumentError(where + "no weight in device memory");
  if (p.w_device_dtype != model::WeightDType::kFloat32) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, model::WeightDTypeName(p.w_device_dtype),
        " device weights need BF16 activations (the GPU engine's bf16 mode), not this fp32 "
        "entry"));
  }
  if (device.blas == nullptr) return absl::InvalidArgumentError(where + "no cuBLAS handle");
  return absl::OkStatus();
}

absl::Status RmsNormCuda(const Device& device, const RmsNormParams& p) {
  const int64_t xs = p.x_stride == 0 ? p.dim : p.x_stride;
  const int64_t os = p.out_stride == 0 ? p.dim : p.out_stride;
  return cuda::RmsNormStridedDevice(p.x, p.rows, p.dim, xs, p.weight, p.eps, p.out, os,
                                    StreamOf(device));
}

absl::Status SwiGluCuda(const Device& device, const SwiGluParams& p) {
  return cuda::SiluMulDevice(p.gate, p.up, p.n, StreamOf(device));
}

absl::Status RopeCuda(const Device& device, const RopeParams& p) {
  return cuda::RopeDevice(p.x, p.rows, p.heads, p.head_stride, p.offset, p.rope_dim, p.positions,
                          p.inv_freq, StreamOf(device));
}

absl::Status LinearCuda(const Device& device, const LinearParams& p) {
  return cuda::GemmF32(static_cast<cublasHandle_t>(device.blas), p.x, p.m, p.w->cols,
                       static_cast<const float*>(p.w_device), p.w->rows, p.y);
}

const OpsBackend kCudaOps = {
    .supports_linear = SupportsLinear,
    .rms_norm = RmsNormCuda,
    .swiglu = SwiGluCuda,
    .rope = RopeCuda,
    .linear = LinearCuda,
};

}  // namespace

void EnableCudaOps() { SetOpsBackend(Backend::kCuda, &kCudaOps); }

}  // namespace splitmoe::kernels
