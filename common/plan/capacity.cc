#include "common/plan/capacity.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace splitmoe::plan {
namespace {

double Touched(double experts, double assignments) {
  // Distinct experts among `experts` that `assignments` uniform picks touch (expected).
  if (experts <= 0) return 0;
  return experts * (1.0 - std::pow(1.0 - 1.0 / experts, assignments));
}

double Max(double a, double b) { return a > b ? a : b; }

}  // namespace

absl::StatusOr<Hardware> ParseHardware(const std::string& json_text, const std::string& what) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a JSON object"));
  }
  Hardware hw;
  auto number = [&](const char* key, double* out, bool required) -> absl::Status {
    if (!j.contains(key)) {
      return required ? absl::InvalidArgumentError(absl::StrCat(what, ": missing \"", key, "\""))
                      : absl::OkStatus();
    }
    if (!j[key].is_number() || !(j[key].get<double>() >= 0)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": \"", key, "\" must be a number >= 0"));
    }
    *out = j[key].get<double>();
    return absl::OkStatus();
  };
  if (j.contains("name") && j["name"].is_string()) hw.name = j["name"].get<std::string>();
  for (auto [key, out, required] :
       {std::tuple<const char*, double*, bool>{"gemm_flops", &hw.gemm_flops, true},
        {"gemm_efficiency", &hw.gemm_efficiency, false},
        {"mem_bw", &hw.mem_bw, true},
        {"mem_efficiency", &hw.mem_efficiency, false},
        {"mem_bytes", &hw.mem_bytes, false},
        {"net_bw", &hw.net_bw, true},
        {"net_latency_s", &hw.net_latency_s, false},
        {"message_overhead_s", &hw.message_overhead_s, false},
        {"weight_bytes", &hw.weight_bytes, false},
        {"kv_bytes", &hw.kv_bytes, false},
        {"wire_bytes", &hw.wire_bytes, false}}) {
    if (absl::Status s = number(key, out, required); !s.ok()) return s;
  }
  if (hw.gemm_flops <= 0 || hw.mem_bw <= 0 || hw.net_bw <= 0 || hw.gemm_efficiency <= 0 ||
      hw.mem_efficiency <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": gemm_flops, mem_bw, net_bw and the efficiencies must be > 0"));
  }
  if (j.contains("colocated")) {
    if (!j["colocated"].is_boolean()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": \"colocated\" must be a boolean"));
    }
    hw.colocated = j["colocated"].get<bool>();
  }
  return hw;
}

ModelCosts Costs(const model::ModelConfig& c) {
  ModelCosts m;
  const double h = static_cast<double>(c.hidden_size), heads = c.num_attention_heads;
  const double qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
  double attention = c.q_lora_rank > 0 ? h * c.q_lora_rank + c.q_lora_rank * heads * qk
                                       : h * heads * qk;
  attention += h * (c.kv_lora_rank + c.qk_rope_head_dim) +
               c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) +
               heads * c.v_head_dim * h;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (c.IsMoeLayer(l)) {
      ++m.moe_layers;
      m.attention_params += c.n_shared_experts * 3.0 * h * c.moe_intermediate_size +
                            h * static_cast<double>(c.n_routed_experts);
    } else {
      ++m.dense_layers;
      m.attention_params += 3.0 * h * c.intermediate_size;
    }
    m.attention_params += attention;
  }
  m.attention_params += static_cast<double>(c.vocab_size) * h;  // the output head
  m.expert_params = 3.0 * h * c.moe_intermediate_size;
  m.latent_values_per_token = static_cast<double>(c.num_hidden_layers) * c.latent_dim();
  // Absorbed attention, per query per key: scores over [c_kv, k_pe], then the sum of c_kv.
  m.attention_flops_per_context_token = static_cast<double>(c.num_hidden_layers) * heads * 2.0 *
                                        (2.0 * c.kv_lora_rank + c.qk_rope_head_dim);
  return m;
}

Prediction Predict(const model::ModelConfig& c, const Hardware& hw, const Deployment& d) {
  const ModelCosts m = Costs(c);
  Prediction p;
  const double wb = hw.weight_bytes, bw = hw.mem_bw * hw.mem_efficiency,
               rate = hw.gemm_flops * hw.gemm_efficiency;
  const double topk = static_cast<double>(c.num_experts_per_tok);
  const double pools = static_cast<double>(std::max<int64_t>(1, d.expert_pools));
  const double replicas = static_cast<double>(std::max<int64_t>(1, d.replicas));
  const double per_pool = static_cast<double>(c.n_routed_experts) / pools;
  // Pools a token's experts sit on: device-limited routing's M, else as many as the top-k spread.
  double m_pools = d.max_devices > 0 ? static_cast<double>(d.max_devices)
                                     : std::min<double>(pools, topk);
  m_pools = std::min(m_pools, pools);
  const double h = static_cast<double>(c.hidden_size);

  // ---- a decode step, batch B on each of D decode devices ----
  const double b = static_cast<double>(d.decode_batch);
  const double context = static_cast<double>(d.prompt_tokens) + d.output_tokens / 2.0;
  const double attn_bytes = m.attention_params * wb + b * context * m.latent_values_per_token * hw.kv_bytes;
  const double attn_flops = b * (2.0 * m.attention_params + context * m.attention_flops_per_context_token);
  double t_attn = Max(attn_bytes / bw, attn_flops / rate);
  const double step_tokens = static_cast<double>(d.decode) * b;  // the whole deployment's
  const double assign = step_tokens * topk / (pools * replicas);  // per expert device per layer
  const double t_expert_layer = Max(Touched(per_pool, assign) * m.expert_params * wb / bw,
                                    assign * 2.0 * m.expert_params / rate);
  double t_experts = static_cast<double>(m.moe_layers) * t_expert_layer;
  // Per MoE layer a decode device sends its tokens' hidden states to the pools holding their
  // experts and gets the weighted sums back: one message each way per pool it reaches.
  const double pools_reached = std::min(pools, std::max(1.0, b * m_pools));
  const double t_net_layer = 2.0 * hw.net_latency_s + 2.0 * pools_reached * hw.message_overhead_s +
                             2.0 * b * m_pools * h * hw.wire_bytes / hw.net_bw;
  double t_net = static_cast<double>(m.moe_layers) * t_net_layer;

  // ---- one prompt's prefill on one prefill device ----
  const double n = static_cast<double>(d.prompt_tokens);
  const double prefill_flops = n * 2.0 * m.attention_params +
                               n * n / 2.0 * m.attention_flops_per_context_token;
  const double prefill_attn = Max(prefill_flops / rate, m.attention_params * wb / bw);
  const double p_assign = n * topk / (pools * replicas);
  const double prefill_expert_layer = Max(Touched(per_pool, p_assign) * m.expert_params * wb / bw,
                                          p_assign * 2.0 * m.expert_params / rate);
  const double prefill_net_layer = 2.0 * hw.net_latency_s + 2.0 * pools * hw.message_overhead_s +
                                   2.0 * n * m_pools * h * hw.wire_bytes / hw.net_bw;
  const double transfer = n * m.latent_values_per_token * hw.kv_bytes / hw.net_bw;
  double t_prefill_experts = static_cast<double>(m.moe_layers) * prefill_expert_layer;
  const double t_prefill_net = static_cast<double>(m.moe_layers) * prefill_net_layer;

  double step;
  if (hw.colocated) {
    // One set of cores: every device's work runs one after the other.
    t_attn *= static_cast<double>(d.decode);
    t_experts *= pools * replicas;
    t_prefill_experts *= pools * replicas;
    step = t_attn + t_experts + t_net;
  } else if (d.micro_batches >= 2 && b >= 2) {
    const double a = t_attn, x = t_experts + t_net;
    step = Max(a, x) + std::min(a, x) / 2.0;
  } else {
    step = t_attn + t_experts + t_net;
  }
  const double prefill = prefill_attn + t_prefill_experts + t_prefill_net + transfer;
  p.attention_s = t_attn;
  p.experts_s = t_experts;
  p.network_s = t_net;
  const double out = static_cast<double>(d.output_tokens);
  if (hw.colocated) {
    // A closed loop of D x B requests sharing the cores: per cycle, every prefill and `out` steps.
    const double reqs = step_tokens;
    const double cycle = reqs * prefill + out * step;
    p.tpot_s = (out * step + (reqs - 1.0) * prefill) / out;
    p.ttft_s = prefill + step / 2.0;
    p.decode_tokens_per_s = reqs * out / cycle;
    p.prefill_tokens_per_s = n / prefill;
  } else {
    p.tpot_s = step;
    p.ttft_s = prefill;
    p.prefill_tokens_per_s = static_cast<double>(d.prefill) * n / prefill;
    // Output tokens/s: what decode sustains, unless the prefill devices cannot supply prompts
    // that fast (each request's prompt for its `out` tokens).
    p.decode_tokens_per_s = std::min(step_tokens / step, p.prefill_tokens_per_s * out / n);
  }
  p.tokens_per_s_per_device = p.decode_tokens_per_s / static_cast<double>(d.devices());
  // What bounds it.
  if (!hw.colocated && p.prefill_tokens_per_s * out / n < step_tokens / step) {
    p.limit = "prefill";
  } else if (t_attn >= t_experts && t_attn >= t_net) {
    p.limit = attn_bytes / bw >= attn_flops / rate ? "decode attention (memory)"
                                                   : "decode attention (compute)";
  } else if (t_experts >= t_net) {
    p.limit = "experts";
  } else {
    p.limit = "network";
  }
  p.memory_per_decode_device =
      m.attention_params * wb +
      b * (static_cast<double>(d.prompt_tokens) + out) * m.latent_values_per_token * hw.kv_bytes;
  p.memory_per_expert_device = per_pool * static_cast<double>(m.moe_layers) * m.expert_params * wb;
  p.fits = hw.mem_bytes <= 0 || (p.memory_per_decode_device <= hw.mem_bytes &&
                                 p.memory_per_expert_device <= hw.mem_bytes);
  return p;
}

std::vector<std::pair<Deployment, Prediction>> BestSplits(const model::ModelConfig& c,
                                                          const Hardware& hw, int64_t devices,
                                                          double target_tpot_s,
                                                          const Deployment& shape, size_t keep) {
  std::vector<std::pair<Deployment, Prediction>> out;
  for (int64_t pools = 1; pools <= std::max<int64_t>(1, c.n_routed_experts); pools *= 2) {
    if (c.n_routed_experts > 0 && c.n_routed_experts % pools != 0) continue;
    for (int64_t prefill = 1; prefill < devices; ++prefill) {
      for (int64_t decode = 1; prefill + decode + pools <= devices; ++decode) {
        const int64_t rest = devices - prefill - decode;
        if (rest % pools != 0) continue;
        for (int64_t batch = 1; batch <= 1024; batch *= 2) {
          Deployment d = shape;
          d.prefill = prefill;
          d.decode = decode;
          d.expert_pools = pools;
          d.replicas = rest / pools;
          d.decode_batch = batch;
          const Prediction p = Predict(c, hw, d);
          if (!p.fits || p.tpot_s > target_tpot_s) continue;
          out.emplace_back(d, p);
        }
      }
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.second.tokens_per_s_per_device > b.second.tokens_per_s_per_device;
  });
  if (out.size() > keep) out.resize(keep);
  return out;
}

}  // namespace splitmoe::plan
