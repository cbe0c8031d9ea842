#include "common/expert_plane/attention_side.h"

#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/rpc/rpc.h"

namespace splitmoe::expert_plane {

absl::StatusOr<std::unique_ptr<AttentionSide>> AttentionSide::Load(
    const std::string& model_dir, const std::string& router_address,
    DirectMoeOptions moe_options, model::ResidentDType weights, bool load_mtp) {
  auto side = std::unique_ptr<AttentionSide>(new AttentionSide());
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  side->config_ = ckpt->config();
  model::LoadOptions options;
  options.routed_experts = false;
  options.mtp = load_mtp;  // only for speculative decoding: otherwise it only takes memory
  options.resident = weights;
  SPLITMOE_ASSIGN_OR_RETURN(side->weights_, model::LoadWeights(*ckpt, options));
  SPLITMOE_RETURN_IF_ERROR(engine::PackForInference(&side->weights_));
  SPLITMOE_ASSIGN_OR_RETURN(side->fingerprint_, rpc::ModelFingerprint(model_dir));
  side->watcher_ = RoutingTableWatcher::Start(router_address);
  SPLITMOE_ASSIGN_OR_RETURN(side->moe_, DirectMoeExecutor::Create(side->config_, side->weights_,
                                                                  side->watcher_.get(),
                                                                  moe_options));
  side->transformer_ =
      std::make_unique<engine::Transformer>(side->config_, side->weights_, side->moe_.get());
  return side;
}

}  // namespace splitmoe::expert_plane
