#include "common/rpc/attention_side.h"

#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/rpc/rpc.h"

namespace splitmoe::rpc {

absl::StatusOr<std::unique_ptr<AttentionSide>> AttentionSide::Load(
    const std::string& model_dir, const std::string& router_address, v1::WireDtype wire_dtype) {
  auto side = std::unique_ptr<AttentionSide>(new AttentionSide());
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  side->config_ = ckpt->config();
  model::LoadOptions options;
  options.routed_experts = false;
  SPLITMOE_ASSIGN_OR_RETURN(side->weights_, model::LoadWeights(*ckpt, options));
  SPLITMOE_RETURN_IF_ERROR(engine::PackForInference(&side->weights_));
  SPLITMOE_ASSIGN_OR_RETURN(side->fingerprint_, ModelFingerprint(model_dir));
  SPLITMOE_ASSIGN_OR_RETURN(side->moe_,
                            RemoteMoeExecutor::Connect(router_address, side->config_, wire_dtype));
  side->transformer_ =
      std::make_unique<engine::Transformer>(side->config_, side->weights_, side->moe_.get());
  return side;
}

}  // namespace splitmoe::rpc
