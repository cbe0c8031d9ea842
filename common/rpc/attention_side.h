// AttentionSide: what a prefill or decode worker computes with — the model's attention side
// (embeddings, MLA, norms, dense layers, shared experts, gates, output head, MTP) loaded from
// the checkpoint, packed for inference, and a Transformer whose routed experts are computed by
// the cluster through the router (RemoteMoeExecutor). No routed expert is loaded. Owned by the
// worker's compute actor; not thread-safe.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto side, AttentionSide::Load(dir, router, v1::WIRE_DTYPE_FP32));
//   side->transformer().Forward(...);
#ifndef SPLITMOE_COMMON_RPC_ATTENTION_SIDE_H_
#define SPLITMOE_COMMON_RPC_ATTENTION_SIDE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/engine/transformer.h"
#include "common/model/config.h"
#include "common/model/weights.h"
#include "common/rpc/remote_moe.h"

namespace splitmoe::rpc {

class AttentionSide {
 public:
  static absl::StatusOr<std::unique_ptr<AttentionSide>> Load(const std::string& model_dir,
                                                             const std::string& router_address,
                                                             v1::WireDtype wire_dtype);

  const model::ModelConfig& config() const { return config_; }
  engine::Transformer& transformer() { return *transformer_; }
  RemoteMoeExecutor& moe() { return *moe_; }
  // Resident weight bytes (fp32 or packed), as `splitmoe status` shows them.
  uint64_t resident_weight_bytes() const { return weights_.bytes(); }
  // The config.json fingerprint workers register with.
  const std::string& fingerprint() const { return fingerprint_; }

 private:
  AttentionSide() = default;
  model::ModelConfig config_;
  model::ModelWeights weights_;
  std::string fingerprint_;
  std::unique_ptr<RemoteMoeExecutor> moe_;
  std::unique_ptr<engine::Transformer> transformer_;
};

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_ATTENTION_SIDE_H_
