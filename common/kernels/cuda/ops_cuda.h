// The CUDA backend of the op interface (common/kernels/ops.h). A GPU binary links
// splitmoe::ops_cuda and calls EnableCudaOps() once; from then on kernels::RmsNorm(device, ...)
// and the other entries run on a Device{Backend::kCuda, index, stream, cublas} through
// cuda_ops.h. CPU binaries never link it, so they never load the CUDA libraries.
#ifndef SPLITMOE_COMMON_KERNELS_CUDA_OPS_CUDA_H_
#define SPLITMOE_COMMON_KERNELS_CUDA_OPS_CUDA_H_

namespace splitmoe::kernels {

// Installs the CUDA implementations (idempotent, any thread).
void EnableCudaOps();

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CUDA_OPS_CUDA_H_
