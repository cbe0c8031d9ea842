#include "common/engine/on_device.h"

#include "absl/strings/str_cat.h"
#include "common/base/log.h"
#include "common/base/status_macros.h"

namespace splitmoe::engine {

absl::StatusOr<std::unique_ptr<OnDevice>> OnDevice::Open(const kernels::Device& device,
                                                         const model::ModelConfig& config,
                                                         const model::ModelWeights& weights,
                                                         const OnDeviceOptions& options) {
  const model::WeightDType dtype = options.weights;
  if (dtype != model::WeightDType::kFloat32 && dtype != model::WeightDType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weights on ", kernels::DeviceName(device), " are fp32 or bf16, not ",
        model::WeightDTypeName(dtype)));
  }
  if (options.cache_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("the device cache needs room for >= 0 tokens, got ", options.cache_tokens));
  }
  std::unique_ptr<OnDevice> d(new OnDevice());
  d->dtype_ = dtype;
  SPLITMOE_ASSIGN_OR_RETURN(
      d->context_, kernels::DeviceContext::Open(device, dtype == model::WeightDType::kFloat32));
  const kernels::Device& on = d->context_->device();
  SPLITMOE_ASSIGN_OR_RETURN(d->weights_, DeviceWeights::Upload(on, weights, dtype));
  LatentPoolOptions pool;
  pool.layers = config.num_hidden_layers;
  pool.latent_dim = config.latent_dim();
  pool.block_tokens = 64;
  pool.blocks = (options.cache_tokens + pool.block_tokens - 1) / pool.block_tokens;
  pool.dtype = dtype == model::WeightDType::kBFloat16 ? kernels::LatentStorage::kBFloat16
                                                      : kernels::LatentStorage::kFloat32;
  if (options.cache_tokens == 0) {
    // The caller brings its own caches (the decode worker's arena: decode/device_arena.h).
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(d->pool_, LatentPool::Create(on, pool));
  }
  if (d->pool_ != nullptr && !weights.mtp.empty()) {
    pool.layers = 1;
    SPLITMOE_ASSIGN_OR_RETURN(d->mtp_pool_, LatentPool::Create(on, pool));
  }
  SPLITMOE_LOG(INFO, "engine").With("device", d->Describe())
          .With("weight_bytes", d->weight_bytes()).With("cache_bytes", d->cache_bytes())
          .With("cache_tokens", pool.blocks * pool.block_tokens)
      << "the forward pass runs on the device";
  return d;
}

absl::StatusOr<std::unique_ptr<SequenceCache>> OnDevice::NewCache(bool mtp) {
  if (pool_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("no latent pool on ", kernels::DeviceName(device()),
                     " (opened with cache_tokens 0: its caller brings the caches)"));
  }
  if (mtp && mtp_pool_ == nullptr) {
    return absl::FailedPreconditionError("no MTP module is loaded on the device");
  }
  return std::unique_ptr<SequenceCache>(
      std::make_unique<PooledSequenceCache>(mtp ? mtp_pool_.get() : pool_.get()));
}

std::string OnDevice::Describe() const {
  return absl::StrCat(kernels::DeviceName(device()),
                      dtype_ == model::WeightDType::kBFloat16 ? " bf16" : " fp32");
}

uint64_t OnDevice::cache_bytes() const {
  return (pool_ != nullptr ? pool_->bytes() : 0) + (mtp_pool_ != nullptr ? mtp_pool_->bytes() : 0);
}

}  // namespace splitmoe::engine
