#include "expert_service/expert_shard.h"

#include <algorithm>
#include <atomic>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/engine/transformer.h"
#include "common/kernels/ops.h"
#include "common/model/checkpoint.h"

namespace splitmoe::expert_service {
namespace {

std::atomic<DeviceExpertsLoader> g_cuda_loader{nullptr};

}  // namespace

void SetCudaExpertsLoader(DeviceExpertsLoader loader) {
  g_cuda_loader.store(loader, std::memory_order_release);
}

std::string ShardDeviceName(const ShardSpec& spec) {
  if (spec.device.backend == kernels::Backend::kCpu) return "cpu";
  return absl::StrCat(kernels::DeviceName(spec.device), spec.device_bf16 ? " bf16" : " fp32");
}

std::vector<int32_t> ShardExperts(int64_t n_routed_experts, const ShardSpec& spec) {
  std::vector<int32_t> out;
  const int64_t begin = spec.shard * n_routed_experts / spec.num_shards;
  const int64_t end = (spec.shard + 1) * n_routed_experts / spec.num_shards;
  for (int64_t e = begin; e < end; ++e) out.push_back(static_cast<int32_t>(e));
  return out;
}

absl::StatusOr<std::unique_ptr<ExpertShard>> ExpertShard::Load(const std::string& model_dir,
                                                               const ShardSpec& spec) {
  if (spec.num_shards < 1 || spec.shard < 0 || spec.shard >= spec.num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", spec.shard, " of ", spec.num_shards, " does not exist"));
  }
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  std::unique_ptr<ExpertShard> shard(new ExpertShard());
  shard->config_ = ckpt->config();
  if (shard->config_.n_routed_experts < spec.num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.num_shards, " shards for ", shard->config_.n_routed_experts, " experts"));
  }
  shard->experts_ = ShardExperts(shard->config_.n_routed_experts, spec);
  const int32_t first = shard->experts_.front(), last = shard->experts_.back();
  model::LoadOptions options;
  options.attention_side = false;  // routed experts only: no embeddings, attention, gate, head
  options.expert_filter = [first, last](int64_t, int64_t e) { return e >= first && e <= last; };
  options.resident = spec.weights;
  SPLITMOE_ASSIGN_OR_RETURN(shard->weights_, model::LoadWeights(*ckpt, options));
  SPLITMOE_RETURN_IF_ERROR(shard->Place(spec));
  return shard;
}

absl::Status ExpertShard::Place(const ShardSpec& spec) {
  device_name_ = ShardDeviceName(spec);
  if (spec.device.backend == kernels::Backend::kCpu) return engine::PackForInference(&weights_);
  const DeviceExpertsLoader loader = g_cuda_loader.load(std::memory_order_acquire);
  if (loader == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "experts on ", kernels::DeviceName(spec.device),
        ": this process has no CUDA backend (built without a CUDA toolkit, or a binary that does "
        "not call EnableCudaExperts()), so only --device cpu is available"));
  }
  SPLITMOE_ASSIGN_OR_RETURN(device_, loader(config_, weights_, spec));
  // The device holds the values now: keep only which experts this shard holds (the matrices
  // emptied, their mapped checkpoint pages let go), for Compute's checks.
  auto drop = [](model::LayerWeights& l) {
    for (auto& e : l.experts) {
      if (e != nullptr) *e = model::MlpWeights{};
    }
  };
  for (model::LayerWeights& l : weights_.layers) drop(l);
  for (model::MtpWeights& m : weights_.mtp) drop(m.block);
  return absl::OkStatus();
}

uint64_t ExpertShard::resident_bytes() const {
  return weights_.bytes() + (device_ != nullptr ? device_->resident_bytes() : 0);
}

absl::StatusOr<std::unique_ptr<ExpertShard>> ExpertShard::LoadPlaced(
    const std::string& model_dir, const ShardSpec& spec,
    std::function<bool(int64_t layer, int64_t expert)> holds) {
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  std::unique_ptr<ExpertShard> shard(new ExpertShard());
  shard->config_ = ckpt->config();
  model::LoadOptions options;
  options.attention_side = false;
  options.expert_filter = std::move(holds);
  options.resident = spec.weights;
  SPLITMOE_ASSIGN_OR_RETURN(shard->weights_, model::LoadWeights(*ckpt, options));
  SPLITMOE_RETURN_IF_ERROR(shard->Place(spec));
  return shard;
}

const model::LayerWeights* ExpertShard::Layer(int64_t layer) const {
  const int64_t main = config_.num_hidden_layers;
  if (layer >= 0 && layer < main) return &weights_.layers[static_cast<size_t>(layer)];
  if (layer >= main && layer < main + static_cast<int64_t>(weights_.mtp.size())) {
    return &weights_.mtp[static_cast<size_t>(layer - main)].block;
  }
  return nullptr;
}

absl::Status ExpertShard::Compute(int64_t layer, absl::Span<const float> hidden, int64_t tokens,
                                  absl::Span<const int32_t> offsets,
                                  absl::Span<const int32_t> expert_ids,
                                  absl::Span<const float> weights, absl::Span<float> out) const {
  const model::LayerWeights* w = Layer(layer);
  if (w == nullptr || !w->is_moe) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
  }
  const int64_t h = config_.hidden_size;
  if (tokens < 0 || static_cast<int64_t>(hidden.size()) != tokens * h ||
      static_cast<int64_t>(out.size()) != tokens * h ||
      static_cast<int64_t>(offsets.size()) != tokens + 1 || expert_ids.size() != weights.size() ||
      (tokens >= 0 && !offsets.empty() &&
       (offsets.front() != 0 || offsets.back() != static_cast<int32_t>(expert_ids.size())))) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert batch of layer ", layer, ": ", tokens, " tokens with ", hidden.size(),
                     " hidden values, ", offsets.size(), " offsets, ", expert_ids.size(),
                     " expert ids, ", weights.size(), " weights (hidden_size ", h, ")"));
  }
  // Every offset in [0, ids] and non-decreasing before any id is read.
  for (int64_t t = 0; t < tokens; ++t) {
    if (offsets[t + 1] < offsets[t] || offsets[t + 1] > static_cast<int32_t>(expert_ids.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expert batch of layer ", layer, ": offsets[", t + 1, "] = ", offsets[t + 1],
          " after ", offsets[t], " (", expert_ids.size(), " expert ids)"));
    }
  }
  for (int64_t t = 0; t < tokens; ++t) {
    for (int32_t i = offsets[t]; i < offsets[t + 1]; ++i) {
      const int32_t e = expert_ids[i];
      if (e < 0 || e >= config_.n_routed_experts || w->experts[static_cast<size_t>(e)] == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", layer, ": expert ", e, " is not hosted by this shard"));
      }
      for (int32_t j = offsets[t]; j < i; ++j) {
        if (expert_ids[j] == e) {
          return absl::InvalidArgumentError(
              absl::StrCat("layer ", layer, ": token ", t, " selects expert ", e, " twice"));
        }
      }
    }
  }
  // [tokens, top_k] slots, a token with fewer experts here padded with empty ones: what
  // kernels::RoutedExperts takes on every device.
  int64_t top_k = 0;
  for (int64_t t = 0; t < tokens; ++t) top_k = std::max<int64_t>(top_k, offsets[t + 1] - offsets[t]);
  std::vector<int32_t> slots(static_cast<size_t>(tokens * top_k), kernels::kNoExpertSlot);
  std::vector<float> slot_weights(static_cast<size_t>(tokens * top_k), 0.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int32_t i = offsets[t]; i < offsets[t + 1]; ++i) {
      slots[static_cast<size_t>(t * top_k + (i - offsets[t]))] = expert_ids[i];
      slot_weights[static_cast<size_t>(t * top_k + (i - offsets[t]))] = weights[i];
    }
  }
  if (device_ != nullptr) {
    return device_->Compute(layer, hidden, tokens, top_k, slots, slot_weights, out);
  }
  const std::vector<const model::MlpWeights*> held = w->HeldExperts();
  kernels::RoutedExpertsParams p;
  p.x = hidden.data();
  p.tokens = tokens;
  p.hidden = h;
  p.inter = config_.moe_intermediate_size;
  p.top_k = top_k;
  p.experts = slots.data();
  p.weights = slot_weights.data();
  p.host = held;
  p.out = out.data();
  return kernels::RoutedExperts(kernels::Device{}, p);
}

}  // namespace splitmoe::expert_service
