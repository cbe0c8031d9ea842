#include "common/routing/expert_routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"

namespace splitmoe::routing {

// ---------------------------------------------------------------------------------------------
// ExpertPlacement

absl::StatusOr<ExpertPlacement> ExpertPlacement::Contiguous(int64_t n_routed_experts,
                                                            int32_t num_devices) {
  if (num_devices < 1 || n_routed_experts < num_devices) {
    return absl::InvalidArgumentError(absl::StrCat("contiguous placement of ", n_routed_experts,
                                                   " experts over ", num_devices,
                                                   " devices: need 1 <= devices <= experts"));
  }
  const int64_t q = n_routed_experts / num_devices, r = n_routed_experts % num_devices;
  std::vector<int32_t> expert_to_device;
  expert_to_device.reserve(static_cast<size_t>(n_routed_experts));
  for (int32_t d = 0; d < num_devices; ++d) {
    const int64_t count = q + (d < r ? 1 : 0);
    expert_to_device.insert(expert_to_device.end(), static_cast<size_t>(count), d);
  }
  return FromAssignment(std::move(expert_to_device), num_devices);
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromAssignment(
    std::vector<int32_t> expert_to_device, int32_t num_devices) {
  if (expert_to_device.empty() || num_devices < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert placement needs experts and devices, got ", expert_to_device.size(),
                     " experts over ", num_devices, " devices"));
  }
  ExpertPlacement p;
  p.num_devices_ = num_devices;
  p.offsets_.assign(static_cast<size_t>(num_devices) + 1, 0);
  for (size_t e = 0; e < expert_to_device.size(); ++e) {
    const int32_t d = expert_to_device[e];
    if (d < 0 || d >= num_devices) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert ", e, " placed on device ", d, " of ", num_devices));
    }
    ++p.offsets_[static_cast<size_t>(d) + 1];
  }
  std::partial_sum(p.offsets_.begin(), p.offsets_.end(), p.offsets_.begin());
  p.by_device_.resize(expert_to_device.size());
  std::vector<int32_t> next(p.offsets_.begin(), p.offsets_.end() - 1);
  for (size_t e = 0; e < expert_to_device.size(); ++e) {
    p.by_device_[static_cast<size_t>(next[static_cast<size_t>(expert_to_device[e])]++)] =
        static_cast<int32_t>(e);
  }
  p.expert_to_device_ = std::move(expert_to_device);
  return p;
}

absl::Span<const int32_t> ExpertPlacement::experts_on(int32_t device) const {
  const auto begin = static_cast<size_t>(offsets_[static_cast<size_t>(device)]);
  const auto end = static_cast<size_t>(offsets_[static_cast<size_t>(device) + 1]);
  return absl::Span<const int32_t>(by_device_.data() + begin, end - begin);
}

int64_t ExpertPlacement::MinExpertsOn(int32_t max_devices) const {
  std::vector<int64_t> sizes(static_cast<size_t>(num_devices_));
  for (int32_t d = 0; d < num_devices_; ++d) {
    sizes[static_cast<size_t>(d)] =
        offsets_[static_cast<size_t>(d) + 1] - offsets_[static_cast<size_t>(d)];
  }
  std::sort(sizes.begin(), sizes.end());
  const auto m = static_cast<size_t>(std::clamp(max_devices, 0, num_devices_));
  return std::accumulate(sizes.begin(), sizes.begin() + static_cast<std::ptrdiff_t>(m), int64_t{0});
}

absl::Status ExpertPlacement::ValidateFor(const model::ModelConfig& config) const {
  if (num_experts() != config.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement covers ", num_experts(),
                                                   " experts, the model has ",
                                                   config.n_routed_experts));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// DeviceLimitedTopK

namespace {

absl::Status CheckRoutingArgs(const model::ModelConfig& config, absl::Span<const float> scores,
                              absl::Span<const float> bias, const ExpertPlacement& placement,
                              int32_t max_devices) {
  const int64_t n = config.n_routed_experts, k = config.num_experts_per_tok;
  if (n <= 0 || k <= 0 || k > n) {
    return absl::InvalidArgumentError(absl::StrCat("routing needs 1 <= num_experts_per_tok (", k,
                                                   ") <= n_routed_experts (", n, ")"));
  }
  if (static_cast<int64_t>(scores.size()) != n ||
      (!bias.empty() && static_cast<int64_t>(bias.size()) != n)) {
    return absl::InvalidArgumentError(absl::StrCat("routing ", n, " experts: got ", scores.size(),
                                                   " scores and ", bias.size(), " biases"));
  }
  for (int64_t e = 0; e < n; ++e) {
    if (!std::isfinite(scores[e]) || (!bias.empty() && !std::isfinite(bias[e]))) {
      return absl::InvalidArgumentError(absl::StrCat("routing: expert ", e, " has score ",
                                                     scores[e], " bias ",
                                                     bias.empty() ? 0.0f : bias[e]));
    }
  }
  if (config.UsesGroups()) {
    if (n % config.n_group != 0 || config.topk_group < 1 || config.topk_group > config.n_group ||
        config.topk_group * (n / config.n_group) < k) {
      return absl::InvalidArgumentError(absl::StrCat("routing: ", n, " experts in ", config.n_group,
                                                     " groups, keeping ", config.topk_group,
                                                     ", cannot give ", k, " experts"));
    }
  }
  if (absl::Status s = placement.ValidateFor(config); !s.ok()) return s;
  if (max_devices < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_devices must be >= 1, got ", max_devices));
  }
  if (placement.MinExpertsOn(max_devices) < k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device-limited routing: some ", max_devices, " devices host only ",
        placement.MinExpertsOn(max_devices), " experts, fewer than num_experts_per_tok ", k));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<engine::ExpertChoice> DeviceLimitedTopK(
    const model::ModelConfig& config, absl::Span<const float> scores, absl::Span<const float> bias,
    const ExpertPlacement& placement, int32_t max_devices, DeviceAffinity affinity) {
  if (absl::Status s = CheckRoutingArgs(config, scores, bias, placement, max_devices); !s.ok()) {
    return s;
  }
  const int64_t n = config.n_routed_experts, k = config.num_experts_per_tok;
  const int32_t num_devices = placement.num_devices();
  const int32_t m = std::min(max_devices, num_devices);

  // 1. The model's ranking of all n experts, from the model's own selection asked for all of
  //    them: the experts of the kept groups first (biased score descending, ties towards the
  //    lower index), then the masked ones. Reusing SelectExperts keeps one implementation of
  //    the model's bias and group rules.
  model::ModelConfig rank_all = config;
  rank_all.num_experts_per_tok = n;
  rank_all.norm_topk_prob = false;
  const std::vector<int32_t> ranking = engine::SelectExperts(rank_all, scores, bias).experts;
  const int64_t candidates = config.UsesGroups() ? config.topk_group * (n / config.n_group) : n;
  // The selection value of an expert: the score plus the bias exactly when SelectExperts adds it.
  const bool biased = config.HasScoreBias() && !bias.empty();
  auto value = [&](int32_t e) { return biased ? scores[e] + bias[e] : scores[e]; };

  // 2. Device affinity over the candidates; a device without candidates scores -inf.
  const int64_t per_device_terms =
      affinity == DeviceAffinity::kMaxExpert ? 1 : (k + m - 1) / m;  // ceil(k / M)
  std::vector<float> device_affinity(static_cast<size_t>(num_devices),
                                     -std::numeric_limits<float>::infinity());
  std::vector<int64_t> terms(static_cast<size_t>(num_devices), 0);
  for (int64_t i = 0; i < candidates; ++i) {
    const int32_t e = ranking[static_cast<size_t>(i)];
    const auto d = static_cast<size_t>(placement.device_of(e));
    if (terms[d] == per_device_terms) continue;
    device_affinity[d] = terms[d] == 0 ? value(e) : device_affinity[d] + value(e);
    ++terms[d];
  }
  std::vector<int32_t> devices(static_cast<size_t>(num_devices));
  std::iota(devices.begin(), devices.end(), 0);
  std::partial_sort(devices.begin(), devices.begin() + m, devices.end(), [&](int32_t a, int32_t b) {
    if (device_affinity[a] != device_affinity[b]) return device_affinity[a] > device_affinity[b];
    return a < b;
  });
  std::vector<bool> chosen(static_cast<size_t>(num_devices), false);
  for (int32_t i = 0; i < m; ++i) chosen[static_cast<size_t>(devices[i])] = true;

  // 3. The model's top-k on the chosen devices: the first k of the ranking that live there
  //    (the non-candidates follow the candidates, so they only fill in when needed).
  engine::ExpertChoice out;
  out.experts.reserve(static_cast<size_t>(k));
  for (int32_t e : ranking) {
    if (!chosen[static_cast<size_t>(placement.device_of(e))]) continue;
    out.experts.push_back(e);
    if (static_cast<int64_t>(out.experts.size()) == k) break;
  }

  // 4. Gate weights from the unbiased scores, in selection order, as SelectExperts computes them.
  out.weights = engine::GateWeights(config, scores, out.experts);
  return out;
}

int32_t DevicesTouched(absl::Span<const int32_t> experts, const ExpertPlacement& placement) {
  std::vector<bool> seen(static_cast<size_t>(placement.num_devices()), false);
  int32_t touched = 0;
  for (int32_t e : experts) {
    const auto d = static_cast<size_t>(placement.device_of(e));
    if (!seen[d]) {
      seen[d] = true;
      ++touched;
    }
  }
  return touched;
}

// ---------------------------------------------------------------------------------------------
// ExpertLoadBalancer

ExpertLoadBalancer::ExpertLoadBalancer(int64_t n_routed, LoadBalancerOptions options)
    : options_(options),
      bias_(static_cast<size_t>(n_routed), 0.0f),
      window_load_(static_cast<size_t>(n_routed), 0) {}

absl::StatusOr<ExpertLoadBalancer> ExpertLoadBalancer::Create(const model::ModelConfig& config,
                                                              LoadBalancerOptions options) {
  if (config.n_routed_experts <= 0) {
    return absl::InvalidArgumentError("load balancing needs a model with routed experts");
  }
  if (!config.HasScoreBias()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "auxiliary-loss-free balancing biases the selection, which only noaux_tc models do; "
        "this model selects with ",
        model::TopkMethodName(config.topk_method)));
  }
  if (!std::isfinite(options.gamma) || options.gamma <= 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("load balancer gamma must be finite and > 0, got ", options.gamma));
  }
  if (!std::isfinite(options.bound) || options.bound < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("load balancer bound must be finite and >= 0, got ", options.bound));
  }
  return ExpertLoadBalancer(config.n_routed_experts, options);
}

absl::Status ExpertLoadBalancer::Record(absl::Span<const int32_t> experts) {
  const auto n = static_cast<int32_t>(window_load_.size());
  for (int32_t e : experts) {
    if (e < 0 || e >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("load balancer: expert ", e, " out of range [0, ", n, ")"));
    }
  }
  for (int32_t e : experts) ++window_load_[static_cast<size_t>(e)];
  window_assignments_ += static_cast<int64_t>(experts.size());
  return absl::OkStatus();
}

absl::Status ExpertLoadBalancer::Record(absl::Span<const engine::ExpertChoice> choices) {
  const auto n = static_cast<int32_t>(window_load_.size());
  for (const engine::ExpertChoice& c : choices) {
    for (int32_t e : c.experts) {
      if (e < 0 || e >= n) {
        return absl::InvalidArgumentError(
            absl::StrCat("load balancer: expert ", e, " out of range [0, ", n, ")"));
      }
    }
  }
  for (const engine::ExpertChoice& c : choices) {
    // Validated above, so this cannot fail.
    for (int32_t e : c.experts) ++window_load_[static_cast<size_t>(e)];
    window_assignments_ += static_cast<int64_t>(c.experts.size());
  }
  return absl::OkStatus();
}

void ExpertLoadBalancer::Rebalance() {
  if (window_assignments_ == 0) return;
  const auto n = static_cast<int64_t>(window_load_.size());
  for (size_t i = 0; i < window_load_.size(); ++i) {
    // load_i vs mean = total / n, compared as load_i * n vs total: exact, no rounding.
    const int64_t scaled = window_load_[i] * n;
    if (scaled < window_assignments_) {
      bias_[i] += options_.gamma;
    } else if (scaled > window_assignments_) {
      bias_[i] -= options_.gamma;
    }
  }
  if (options_.recenter) {
    double sum = 0;
    for (float b : bias_) sum += b;
    const auto mean = static_cast<float>(sum / static_cast<double>(bias_.size()));
    for (float& b : bias_) b -= mean;
  }
  if (options_.bound > 0.0f) {
    for (float& b : bias_) b = std::clamp(b, -options_.bound, options_.bound);
  }
  std::fill(window_load_.begin(), window_load_.end(), 0);
  window_assignments_ = 0;
  ++rebalances_;
}

void ExpertLoadBalancer::Reset() {
  std::fill(bias_.begin(), bias_.end(), 0.0f);
  std::fill(window_load_.begin(), window_load_.end(), 0);
  window_assignments_ = 0;
}

absl::Status ExpertLoadBalancer::RecordLoads(absl::Span<const uint64_t> load) {
  if (load.size() != window_load_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("load balancer: loads of ", load.size(),
                                                   " experts, want ", window_load_.size()));
  }
  for (size_t e = 0; e < load.size(); ++e) {
    window_load_[e] += static_cast<int64_t>(load[e]);
    window_assignments_ += static_cast<int64_t>(load[e]);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> ExpertLoadBalancer::SelectionBias(
    absl::Span<const float> checkpoint_bias) const {
  std::vector<float> out(bias_.begin(), bias_.end());
  if (checkpoint_bias.empty()) return out;
  if (checkpoint_bias.size() != out.size()) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint bias has ", checkpoint_bias.size(),
                                                   " experts, the balancer ", out.size()));
  }
  for (size_t i = 0; i < out.size(); ++i) out[i] += checkpoint_bias[i];
  return out;
}

}  // namespace splitmoe::routing
