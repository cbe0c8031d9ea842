// ExpertShard: the routed experts one expert service hosts — every MoE layer's experts of its
// shard (MTP blocks included) — and their computation: for a batch of tokens routed here, each
// token's gate-weighted sum over the experts it selected on this shard. A token therefore costs
// one vector back per shard it touched. Immutable after Load; Compute may run on any thread.
//
// On the CPU (the default) the experts stay in the checkpoint's dtype and run through the
// engine's AccumulateExperts. With ShardSpec::device a CUDA device (`splitmoe expert --device
// cuda:N`) they are uploaded once and every batch runs there as grouped GEMMs
// (expert_service/cuda/, installed by EnableCudaExperts()); the host keeps no copy.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto shard, ExpertShard::Load(dir, ShardSpec{.shard = 1, .num_shards
//   = 2})); SPLITMOE_RETURN_IF_ERROR(shard->Compute(layer, hidden, tokens, offsets, experts,
//   weights, out));
#ifndef SPLITMOE_EXPERT_SERVICE_EXPERT_SHARD_H_
#define SPLITMOE_EXPERT_SERVICE_EXPERT_SHARD_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/kernels/ops.h"
#include "common/model/config.h"
#include "common/model/checkpoint.h"
#include "common/model/weights.h"

namespace splitmoe::expert_service {

// Contiguous placement: shard s of n holds experts [s * E / n, (s + 1) * E / n).
struct ShardSpec {
  int32_t shard = 0;
  int32_t num_shards = 1;
  // How the shard holds its experts (`--weights`): in the checkpoint's dtype, or fp32.
  model::ResidentDType weights = model::ResidentDType::kCheckpoint;
  // Where the experts live and compute (`--device cpu|cuda:N`).
  kernels::Device device;
  // On a CUDA device (`--precision`): false, fp32 weights and SGEMMs without TF32 (the
  // reference mode, the CPU's results up to summation order); true, BF16 weights and GEMM inputs
  // with fp32 accumulation (FP8 experts are widened, then rounded to BF16).
  bool device_bf16 = false;
};

// "cpu", or "cuda:N fp32" / "cuda:N bf16": what a shard of `spec` reports as its device.
std::string ShardDeviceName(const ShardSpec& spec);

// A shard's experts resident on an accelerator. Compute runs kernels::RoutedExperts on a batch
// ExpertShard::Compute has already checked, its choice as [tokens, top_k] slots (a token with
// fewer experts here padded with kernels::kNoExpertSlot); it may be called from several threads.
class DeviceExperts {
 public:
  virtual ~DeviceExperts() = default;
  virtual absl::Status Compute(int64_t layer, absl::Span<const float> hidden, int64_t tokens,
                               int64_t top_k, absl::Span<const int32_t> slot_experts,
                               absl::Span<const float> slot_weights, absl::Span<float> out) = 0;
  // Bytes of weights resident on the device.
  virtual uint64_t resident_bytes() const = 0;
};

// Makes the DeviceExperts of every expert `weights` holds (main layers, then MTP blocks: the
// `layer` Compute is given) on spec.device.
using DeviceExpertsLoader = absl::StatusOr<std::unique_ptr<DeviceExperts>> (*)(
    const model::ModelConfig& config, const model::ModelWeights& weights, const ShardSpec& spec);
// Installs the loader of CUDA devices (process-wide, set once before loading a shard; see
// expert_service/cuda/gpu_experts.h). Without it a shard on cuda:N is refused.
void SetCudaExpertsLoader(DeviceExpertsLoader loader);

// The experts shard `spec` holds under contiguous placement, ascending.
std::vector<int32_t> ShardExperts(int64_t n_routed_experts, const ShardSpec& spec);

class ExpertShard {
 public:
  static absl::StatusOr<std::unique_ptr<ExpertShard>> Load(const std::string& model_dir,
                                                           const ShardSpec& spec);
  // The experts of an EPLB placement: (layer, expert) where `holds` is true.
  static absl::StatusOr<std::unique_ptr<ExpertShard>> LoadPlaced(
      const std::string& model_dir, const ShardSpec& spec,
      std::function<bool(int64_t layer, int64_t expert)> holds);

  const model::ModelConfig& config() const { return config_; }
  // Under contiguous placement (Load): the experts of every MoE layer; placed: none listed.
  const std::vector<int32_t>& experts() const { return experts_; }
  // Bytes of expert weights resident in this process: on the host, or on its device.
  uint64_t resident_bytes() const;
  // ShardDeviceName of its spec.
  const std::string& device() const { return device_name_; }

  // out[t] = sum over i in [offsets[t], offsets[t+1]) of weights[i] * expert_ids[i](hidden[t]).
  // hidden/out [tokens, hidden_size]; offsets has tokens + 1 entries. `layer` indexes main layers
  // then MTP blocks. An expert not held here, a dense layer or ragged sizes: InvalidArgument.
  absl::Status Compute(int64_t layer, absl::Span<const float> hidden, int64_t tokens,
                       absl::Span<const int32_t> offsets, absl::Span<const int32_t> expert_ids,
                       absl::Span<const float> weights, absl::Span<float> out) const;

 private:
  ExpertShard() = default;
  const model::LayerWeights* Layer(int64_t layer) const;
  // After LoadWeights: packs them for the CPU, or moves them to spec.device (the host keeping
  // only which experts it holds).
  absl::Status Place(const ShardSpec& spec);

  model::ModelConfig config_;
  model::ModelWeights weights_;
  std::vector<int32_t> experts_;
  std::string device_name_ = "cpu";
  std::unique_ptr<DeviceExperts> device_;  // null on the CPU
};

}  // namespace splitmoe::expert_service

#endif  // SPLITMOE_EXPERT_SERVICE_EXPERT_SHARD_H_
