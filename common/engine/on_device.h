// OnDevice: what a forward pass needs on a device other than the CPU — the device's context
// (its stream and cuBLAS handle), the weights' device copies, and the latent pools its
// sequences' caches come from (every main layer; the MTP module's one layer). The engine and
// the attention workers each hold one when they run on a GPU; on the CPU they hold none.
// Destroyed in the right order: caches and buffers before the stream they free on.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto gpu, OnDevice::Open(device, config, weights, {}));
//   Transformer model(config, weights, &moe, gpu->weights());
//   SPLITMOE_ASSIGN_OR_RETURN(auto cache, gpu->NewCache(/*mtp=*/false));
#ifndef SPLITMOE_COMMON_ENGINE_ON_DEVICE_H_
#define SPLITMOE_COMMON_ENGINE_ON_DEVICE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/engine/device_weights.h"
#include "common/engine/latent_cache.h"
#include "common/engine/pooled_latent_cache.h"
#include "common/kernels/ops.h"
#include "common/model/config.h"
#include "common/model/weights.h"

namespace splitmoe::engine {

struct OnDeviceOptions {
  // kFloat32 (the mode that must give the CPU's greedy tokens) or kBFloat16 (the fast mode):
  // the weights' copies and the latent pools (BF16 latents in the BF16 mode).
  model::WeightDType weights = model::WeightDType::kFloat32;
  // Tokens every sequence's cache of the main layers can hold together (and, with MTP weights,
  // the module's as many); 0: no pool (NewCache fails), for a caller with caches of its own.
  int64_t cache_tokens = 32768;
};

class OnDevice {
 public:
  // Opens `device` (a cuda:N in a process whose CUDA backend is enabled), uploads `weights`
  // (which must outlive this) and allocates the pools.
  static absl::StatusOr<std::unique_ptr<OnDevice>> Open(const kernels::Device& device,
                                                        const model::ModelConfig& config,
                                                        const model::ModelWeights& weights,
                                                        const OnDeviceOptions& options);

  const kernels::Device& device() const { return context_->device(); }
  const DeviceWeights* weights() const { return weights_.get(); }
  // An empty cache for one sequence, its blocks from the pool (ResourceExhausted when a pass
  // needs more than remain): every main layer, or the MTP module's one (`mtp`).
  absl::StatusOr<std::unique_ptr<SequenceCache>> NewCache(bool mtp);
  // "cuda:0 bf16": where and how it computes, as workers register it.
  std::string Describe() const;
  // Device bytes: weights, and the pools.
  uint64_t weight_bytes() const { return weights_->bytes(); }
  uint64_t cache_bytes() const;

 private:
  OnDevice() = default;
  // Declared first, destroyed last: the buffers below free on its stream.
  std::unique_ptr<kernels::DeviceContext> context_;
  model::WeightDType dtype_ = model::WeightDType::kFloat32;
  std::unique_ptr<DeviceWeights> weights_;
  std::unique_ptr<LatentPool> pool_, mtp_pool_;
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_ON_DEVICE_H_
