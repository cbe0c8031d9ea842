// GpuEngine: the single-process engine's forward pass on one CUDA device, built from the op
// interface (common/kernels/ops.h) on a cuda:N Device — the entries the CPU Transformer calls on
// the CPU — plus its own latent stores (common/kernels/cuda/cuda_ops.h). Same math as
// engine::Transformer in its absorbed form (RMSNorm, MLA with the latent cache, dense SwiGLU,
// DeepSeekMoE with group-limited selection and the bias for selection only, final norm, output
// head); sampling and logprobs run on the host with engine::SampleToken / ComputeLogprob on
// the device's logits, so a seeded request samples like the CPU engine.
//
// Two precisions:
//   kFp32: weights and activations fp32, SGEMM (no TF32), fp32 latent cache — the mode that must
//          give the CPU engine's greedy tokens;
//   kBf16: BF16 weights and GEMM inputs with fp32 accumulation, BF16 latent cache — the fast
//          mode, whose drift against fp32 is measured, not asserted.
// The latent cache is paged (64-token blocks, latent_dim values per token: the FlashMLA layout)
// in device memory. Prompts are prefilled in 256-token chunks with the same paged attention
// kernel (each prompt position attends to the cache up to itself). One sequence at a time; MTP
// modules are not run. Not thread-safe.
//
// Status: compiled; checked against the CPU engine by tests/kernels/gpu_engine_test.cc, which
// needs a GPU (scripts/gpu-check.sh) — not yet run anywhere.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto gpu, GpuEngine::Load(dir, {.device = 0}));
//   SPLITMOE_ASSIGN_OR_RETURN(engine::GenerateResult out, gpu->Generate(request));
#ifndef SPLITMOE_COMMON_ENGINE_CUDA_GPU_ENGINE_H_
#define SPLITMOE_COMMON_ENGINE_CUDA_GPU_ENGINE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/engine/engine.h"

namespace splitmoe::engine {

enum class GpuPrecision { kFp32, kBf16 };

struct GpuEngineOptions {
  int device = 0;
  GpuPrecision precision = GpuPrecision::kFp32;
  // Longest sequence (prompt + generated) the device cache is sized for.
  int64_t max_context = 4096;
};

class GpuEngine {
 public:
  static absl::StatusOr<std::unique_ptr<GpuEngine>> Load(const std::string& model_dir,
                                                         const GpuEngineOptions& options);
  ~GpuEngine();
  GpuEngine(const GpuEngine&) = delete;
  GpuEngine& operator=(const GpuEngine&) = delete;

  const model::ModelConfig& config() const;
  // Token ids only (no stop strings); logprobs, stop ids and eos as the CPU engine.
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request);

 private:
  struct Impl;
  explicit GpuEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_CUDA_GPU_ENGINE_H_
