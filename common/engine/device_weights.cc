#include "common/engine/device_weights.h"

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/model/numeric.h"

namespace splitmoe::engine {
namespace {

// m's values as fp32 on the host (widened from BF16/FP8 where held so).
absl::StatusOr<std::vector<float>> HostValues(const model::Matrix& m) {
  if (m.packed != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "a ", m.rows, "x", m.cols, " weight is packed for oneDNN: a device upload needs the "
        "weights unpacked (load without PackForInference)"));
  }
  if (!m.narrow()) return m.data;
  std::vector<float> values(static_cast<size_t>(m.rows * m.cols));
  kernels::WidenRows(m, 0, m.rows, values.data());
  return values;
}

}  // namespace

absl::StatusOr<const void*> DeviceWeights::Put(const std::vector<float>& values, bool as_bf16) {
  const size_t bytes = values.size() * (as_bf16 ? 2 : 4);
  SPLITMOE_ASSIGN_OR_RETURN(kernels::DeviceBuffer buffer, kernels::Allocate(device_, bytes));
  if (as_bf16) {
    std::vector<uint16_t> rounded(values.size());
    for (size_t i = 0; i < values.size(); ++i) rounded[i] = model::FloatToBf16(values[i]);
    SPLITMOE_RETURN_IF_ERROR(kernels::CopyToDevice(device_, buffer.data(), rounded.data(), bytes));
  } else {
    SPLITMOE_RETURN_IF_ERROR(kernels::CopyToDevice(device_, buffer.data(), values.data(), bytes));
  }
  const void* data = buffer.data();
  bytes_ += bytes;
  owned_.push_back(std::move(buffer));
  return data;
}

absl::Status DeviceWeights::AddMatrix(const model::Matrix& m, bool keep_fp32) {
  if (m.empty()) return absl::OkStatus();
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<float> values, HostValues(m));
  const bool bf16 = !keep_fp32 && matrices_ == model::WeightDType::kBFloat16;
  SPLITMOE_ASSIGN_OR_RETURN(const void* data, Put(values, bf16));
  tensors_[&m] = {data, bf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32};
  return absl::OkStatus();
}

absl::Status DeviceWeights::AddVector(const std::vector<float>& v) {
  if (v.empty()) return absl::OkStatus();
  SPLITMOE_ASSIGN_OR_RETURN(const void* data, Put(v, false));
  tensors_[&v] = {data, model::WeightDType::kFloat32};
  return absl::OkStatus();
}

absl::Status DeviceWeights::AddLayer(const model::LayerWeights& l) {
  for (const std::vector<float>* v : {&l.input_norm, &l.post_attention_norm, &l.attn.q_a_norm,
                                      &l.attn.kv_a_norm, &l.gate_bias}) {
    SPLITMOE_RETURN_IF_ERROR(AddVector(*v));
  }
  for (const model::Matrix* m : {&l.attn.q_proj, &l.attn.q_a_proj, &l.attn.q_b_proj,
                                 &l.attn.kv_a_proj, &l.attn.o_proj, &l.dense.gate, &l.dense.up,
                                 &l.dense.down, &l.shared.gate, &l.shared.up, &l.shared.down}) {
    SPLITMOE_RETURN_IF_ERROR(AddMatrix(*m, /*keep_fp32=*/false));
  }
  SPLITMOE_RETURN_IF_ERROR(AddMatrix(l.attn.kv_b_proj, /*keep_fp32=*/true));
  SPLITMOE_RETURN_IF_ERROR(AddMatrix(l.gate, /*keep_fp32=*/true));
  if (!l.is_moe || l.experts.empty()) return absl::OkStatus();
  const bool bf16 = matrices_ == model::WeightDType::kBFloat16;
  Experts experts;
  for (size_t id = 0; id < l.experts.size(); ++id) {
    const model::MlpWeights* e = l.experts[id].get();
    if (e == nullptr) {
      experts.gate_up.push_back(nullptr);
      experts.down.push_back(nullptr);
      continue;
    }
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<float> gate_up, HostValues(e->gate));
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<float> up, HostValues(e->up));
    gate_up.insert(gate_up.end(), up.begin(), up.end());
    SPLITMOE_ASSIGN_OR_RETURN(const void* gu, Put(gate_up, bf16));
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<float> down_values, HostValues(e->down));
    SPLITMOE_ASSIGN_OR_RETURN(const void* down, Put(down_values, bf16));
    experts.gate_up.push_back(gu);
    experts.down.push_back(down);
  }
  experts_[&l] = std::move(experts);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DeviceWeights>> DeviceWeights::Upload(
    const kernels::Device& device, const model::ModelWeights& w, model::WeightDType matrices) {
  if (matrices != model::WeightDType::kFloat32 && matrices != model::WeightDType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device weights are fp32 or bf16, not ", model::WeightDTypeName(matrices)));
  }
  std::unique_ptr<DeviceWeights> d(new DeviceWeights(device, matrices));
  SPLITMOE_RETURN_IF_ERROR(d->AddMatrix(w.embed, /*keep_fp32=*/true));
  SPLITMOE_RETURN_IF_ERROR(d->AddVector(w.final_norm));
  SPLITMOE_RETURN_IF_ERROR(d->AddMatrix(w.lm_head, /*keep_fp32=*/false));
  for (size_t i = 0; i < w.layers.size(); ++i) {
    SPLITMOE_RETURN_IF_ERROR(Annotate(d->AddLayer(w.layers[i]), absl::StrCat("layer ", i)));
  }
  for (size_t k = 0; k < w.mtp.size(); ++k) {
    const model::MtpWeights& m = w.mtp[k];
    const std::string where = absl::StrCat("MTP module ", k);
    SPLITMOE_RETURN_IF_ERROR(Annotate(d->AddMatrix(m.embed, /*keep_fp32=*/true), where));
    for (const std::vector<float>* v : {&m.enorm, &m.hnorm, &m.head_norm}) {
      SPLITMOE_RETURN_IF_ERROR(Annotate(d->AddVector(*v), where));
    }
    SPLITMOE_RETURN_IF_ERROR(Annotate(d->AddMatrix(m.eh_proj, false), where));
    SPLITMOE_RETURN_IF_ERROR(Annotate(d->AddMatrix(m.head, false), where));
    SPLITMOE_RETURN_IF_ERROR(Annotate(d->AddLayer(m.block), where));
  }
  SPLITMOE_RETURN_IF_ERROR(kernels::Synchronize(device));
  return d;
}

DeviceWeights::Tensor DeviceWeights::Find(const model::Matrix& m) const {
  auto it = tensors_.find(&m);
  return it == tensors_.end() ? Tensor{} : it->second;
}

const float* DeviceWeights::Find(const std::vector<float>& v) const {
  auto it = tensors_.find(&v);
  return it == tensors_.end() ? nullptr : static_cast<const float*>(it->second.data);
}

const DeviceWeights::Experts* DeviceWeights::FindExperts(const model::LayerWeights& layer) const {
  auto it = experts_.find(&layer);
  return it == experts_.end() ? nullptr : &it->second;
}

}  // namespace splitmoe::engine
