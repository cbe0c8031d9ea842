// An expert service's shard on a CUDA device (`splitmoe expert --device cuda:N [--precision
// fp32|bf16]`): every held expert uploaded once — gate and up projections as one [2 * inter,
// hidden] matrix, down as [hidden, inter], fp32 or BF16 (BF16 and FP8 checkpoints widened
// exactly on the host first) — and each batch run there by kernels::cuda::MoeExperts*Device as
// grouped GEMMs (a GEMM per expert over the tokens it received, the tokens' sums in ascending
// expert order as the CPU's). Batches come and go in host memory (the wire's), one at a time on
// the device's stream. Built only where CMake finds a CUDA toolkit; `splitmoe` calls
// EnableCudaExperts() at start in such a build.
//
// Status: compiled; checked against the CPU shard by tests/expert_service/gpu_experts_test.cc,
// which needs a GPU (scripts/gpu-check.sh) — not yet run anywhere.
#ifndef SPLITMOE_EXPERT_SERVICE_CUDA_GPU_EXPERTS_H_
#define SPLITMOE_EXPERT_SERVICE_CUDA_GPU_EXPERTS_H_

namespace splitmoe::expert_service {

// Installs the CUDA loader of expert shards (SetCudaExpertsLoader); idempotent, any thread.
void EnableCudaExperts();

}  // namespace splitmoe::expert_service

#endif  // SPLITMOE_EXPERT_SERVICE_CUDA_GPU_EXPERTS_H_
