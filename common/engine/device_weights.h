// DeviceWeights: the forward pass's weights copied to a device other than the CPU, as its ops
// take them (kernels/ops.h): each projection, head and expert in fp32 or BF16, each norm
// vector and bias in fp32, found by the host tensor it copies. The host ModelWeights a
// Transformer is built on keep giving the shapes (and the CPU-only steps nothing); their values
// may be held in any dtype (fp32, or BF16/FP8 mapped from the checkpoint: widened, then rounded
// to BF16 in the BF16 mode, on upload), not packed.
//
// What stays fp32 in both modes, as the CUDA ops take it: the embedding table (Embed), the MoE
// gate (its scores choose the experts) and kv_b_proj (the absorbed MLA's per-head products).
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto on_gpu, DeviceWeights::Upload(device, weights, kBFloat16));
//   Transformer model(config, weights, &moe, on_gpu.get());
#ifndef SPLITMOE_COMMON_ENGINE_DEVICE_WEIGHTS_H_
#define SPLITMOE_COMMON_ENGINE_DEVICE_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "common/kernels/ops.h"
#include "common/model/weights.h"

namespace splitmoe::engine {

class DeviceWeights {
 public:
  // `matrices`: kFloat32 (the reference mode) or kBFloat16, for the projections, the dense and
  // shared MLPs, the routed experts and the output heads.
  static absl::StatusOr<std::unique_ptr<DeviceWeights>> Upload(const kernels::Device& device,
                                                               const model::ModelWeights& weights,
                                                               model::WeightDType matrices);

  struct Tensor {
    const void* data = nullptr;
    model::WeightDType dtype = model::WeightDType::kFloat32;
  };
  const kernels::Device& device() const { return device_; }
  model::WeightDType matrices() const { return matrices_; }
  // The device copy of `m`; null data when it has none (absent in the model).
  Tensor Find(const model::Matrix& m) const;
  // The device copy of a norm vector or bias; null when it has none (empty).
  const float* Find(const std::vector<float>& v) const;
  // A MoE layer's routed experts by id, as kernels::RoutedExperts takes them on the device
  // ([2 * inter, hidden] gate_proj then up_proj rows; [hidden, inter] down_proj), null where
  // the layer does not hold the expert; null when `layer` has none on the device.
  struct Experts {
    std::vector<const void*> gate_up, down;
  };
  const Experts* FindExperts(const model::LayerWeights& layer) const;
  // Device bytes of every copy.
  uint64_t bytes() const { return bytes_; }

 private:
  DeviceWeights(const kernels::Device& device, model::WeightDType matrices)
      : device_(device), matrices_(matrices) {}
  absl::Status AddMatrix(const model::Matrix& m, bool keep_fp32);
  absl::Status AddVector(const std::vector<float>& v);
  absl::Status AddLayer(const model::LayerWeights& l);
  absl::StatusOr<const void*> Put(const std::vector<float>& values, bool as_bf16);

  kernels::Device device_;
  model::WeightDType matrices_;
  std::vector<kernels::DeviceBuffer> owned_;
  absl::flat_hash_map<const void*, Tensor> tensors_;  // by host Matrix or vector
  absl::flat_hash_map<const model::LayerWeights*, Experts> experts_;
  uint64_t bytes_ = 0;
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_DEVICE_WEIGHTS_H_
