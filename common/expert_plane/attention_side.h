// AttentionSide: what a prefill or decode worker computes with — the model's attention side
// (embeddings, MLA, norms, dense layers, shared experts, gates, output head, MTP) loaded from
// the checkpoint, packed for inference, and a Transformer whose routed experts are computed by
// the expert pools directly (DirectMoeExecutor over the router's routing table, which a
// RoutingTableWatcher keeps current). No routed expert is loaded. The transformer is owned by
// the worker's compute actor; not thread-safe.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto side, AttentionSide::Load(dir, router, {.dtype = bf16}));
// With `load_mtp`, the MTP modules' attention side too (speculative decoding: the decode worker
// drafts with it, the prefill worker fills its cache); their routed experts are the expert
// services', as the main layers'.
//   side->transformer().Forward(...);
#ifndef SPLITMOE_COMMON_EXPERT_PLANE_ATTENTION_SIDE_H_
#define SPLITMOE_COMMON_EXPERT_PLANE_ATTENTION_SIDE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/engine/on_device.h"
#include "common/engine/transformer.h"
#include "common/expert_plane/direct_moe.h"
#include "common/expert_plane/routing_table_watcher.h"
#include "common/model/config.h"
#include "common/model/weights.h"

namespace splitmoe::expert_plane {

class AttentionSide {
 public:
  // `device`: "cpu", or "cuda:N" (its CUDA backend enabled in this process): the transformer
  // then runs there (weights uploaded per `on_device`, caches from the device's pool) and the
  // routed experts' inputs and outputs are staged through host memory (StagedMoeExecutor).
  static absl::StatusOr<std::unique_ptr<AttentionSide>> Load(
      const std::string& model_dir, const std::string& router_address,
      DirectMoeOptions moe_options, model::ResidentDType weights, bool load_mtp = false,
      const std::string& device = "cpu", const engine::OnDeviceOptions& on_device = {});

  const model::ModelConfig& config() const { return config_; }
  engine::Transformer& transformer() { return *transformer_; }
  DirectMoeExecutor& moe() { return *moe_; }
  const RoutingTableWatcher& routing_table() const { return *watcher_; }
  // Resident weight bytes (checkpoint dtype, fp32 or packed), as `splitmoe status` shows them.
  uint64_t resident_weight_bytes() const { return weights_.bytes(); }
  // The config.json fingerprint workers register with.
  const std::string& fingerprint() const { return fingerprint_; }
  // Null on the CPU.
  engine::OnDevice* on_device() { return on_device_.get(); }
  // "cpu", or "cuda:0 bf16": as the worker registers its device.
  std::string device_description() const {
    return on_device_ != nullptr ? on_device_->Describe() : "cpu";
  }

 private:
  AttentionSide() = default;
  model::ModelConfig config_;
  model::ModelWeights weights_;
  std::string fingerprint_;
  std::unique_ptr<RoutingTableWatcher> watcher_;
  std::unique_ptr<engine::OnDevice> on_device_;
  std::unique_ptr<DirectMoeExecutor> moe_;
  std::unique_ptr<engine::StagedMoeExecutor> staged_;  // on a device: moe_, staged
  std::unique_ptr<engine::Transformer> transformer_;
};

}  // namespace splitmoe::expert_plane

#endif  // SPLITMOE_COMMON_EXPERT_PLANE_ATTENTION_SIDE_H_
