#include "common/expert_plane/attention_side.h"

#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/rpc/rpc.h"

namespace splitmoe::expert_plane {

absl::StatusOr<std::unique_ptr<AttentionSide>> AttentionSide::Load(
    const std::string& model_dir, const std::string& router_address,
    DirectMoeOptions moe_options, model::ResidentDType weights, bool load_mtp,
    const std::string& device, const engine::OnDeviceOptions& on_device) {
  SPLITMOE_ASSIGN_OR_RETURN(const kernels::Device target, kernels::ParseDevice(device));
  auto side = std::unique_ptr<AttentionSide>(new AttentionSide());
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  side->config_ = ckpt->config();
  model::LoadOptions options;
  options.routed_experts = false;
  options.mtp = load_mtp;  // only for speculative decoding: otherwise it only takes memory
  options.resident = weights;
  SPLITMOE_ASSIGN_OR_RETURN(side->weights_, model::LoadWeights(*ckpt, options));
  if (target.backend == kernels::Backend::kCpu) {
    SPLITMOE_RETURN_IF_ERROR(engine::PackForInference(&side->weights_));
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(side->on_device_, engine::OnDevice::Open(target, side->config_,
                                                                       side->weights_, on_device));
  }
  SPLITMOE_ASSIGN_OR_RETURN(side->fingerprint_, rpc::ModelFingerprint(model_dir));
  side->watcher_ = RoutingTableWatcher::Start(router_address);
  SPLITMOE_ASSIGN_OR_RETURN(side->moe_, DirectMoeExecutor::Create(side->config_, side->weights_,
                                                                  side->watcher_.get(),
                                                                  moe_options));
  engine::MoeExecutor* moe = side->moe_.get();
  const engine::DeviceWeights* on = nullptr;
  if (side->on_device_ != nullptr) {
    side->staged_ = std::make_unique<engine::StagedMoeExecutor>(
        side->moe_.get(), side->on_device_->device(), side->config_);
    moe = side->staged_.get();
    on = side->on_device_->weights();
  }
  side->transformer_ =
      std::make_unique<engine::Transformer>(side->config_, side->weights_, moe, on);
  return side;
}

}  // namespace splitmoe::expert_plane
