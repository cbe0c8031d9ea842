// The router's expert selection across expert-service devices (shards):
//
//  - ExpertPlacement: which device hosts each routed expert.
//  - DeviceLimitedTopK: DeepSeek-V2's device-limited routing on top of the model's own
//    selection (engine::SelectExperts): a token's experts lie on at most M devices, so it costs
//    at most M dispatch messages and M partial sums back.
//  - ExpertLoadBalancer: DeepSeek-V3's auxiliary-loss-free balancing at serving time: a
//    per-expert bias, nudged after every window of traffic towards the under-loaded experts,
//    used for the selection only.
//
// Placement and DeviceLimitedTopK are immutable / pure: any thread. ExpertLoadBalancer is NOT
// thread-safe: one per MoE layer, owned by the router's expert-router actor, which records each
// batch's selections and calls Rebalance() between batches.
//
//   SPLITMOE_ASSIGN_OR_RETURN(ExpertPlacement placement,
//                             ExpertPlacement::Contiguous(config.n_routed_experts, 8));
//   SPLITMOE_ASSIGN_OR_RETURN(ExpertLoadBalancer balancer, ExpertLoadBalancer::Create(config));
//   SPLITMOE_ASSIGN_OR_RETURN(std::vector<float> bias,
//                             balancer.SelectionBias(checkpoint_bias));  // once per batch
//   for each token t:
//     SPLITMOE_ASSIGN_OR_RETURN(engine::ExpertChoice choice,
//         DeviceLimitedTopK(config, scores_row(t), bias, placement, /*max_devices=*/3));
//     SPLITMOE_RETURN_IF_ERROR(balancer.Record(choice.experts));
//   balancer.Rebalance();  // every N batches
#ifndef SPLITMOE_COMMON_ROUTING_EXPERT_ROUTING_H_
#define SPLITMOE_COMMON_ROUTING_EXPERT_ROUTING_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/engine/routing.h"
#include "common/model/config.h"

namespace splitmoe::routing {

// expert -> device for the n routed experts of one model; every expert on exactly one device.
// Replicas of a device's experts (a pool of expert services) are the scheduler's business, not
// the placement's.
class ExpertPlacement {
 public:
  // Device d hosts a contiguous range of experts; with n = q * D + r the first r devices get
  // q + 1 experts and the others q (n % D == 0: n / D each, the usual case).
  // InvalidArgument unless 1 <= num_devices <= n_routed_experts.
  static absl::StatusOr<ExpertPlacement> Contiguous(int64_t n_routed_experts, int32_t num_devices);
  // expert_to_device [n_routed] with values in [0, num_devices). Devices may host no expert
  // (e.g. a drained shard). InvalidArgument for an empty table, num_devices < 1 or a value out
  // of range.
  static absl::StatusOr<ExpertPlacement> FromAssignment(std::vector<int32_t> expert_to_device,
                                                        int32_t num_devices);

  int64_t num_experts() const { return static_cast<int64_t>(expert_to_device_.size()); }
  int32_t num_devices() const { return num_devices_; }
  int32_t device_of(int32_t expert) const { return expert_to_device_[static_cast<size_t>(expert)]; }
  // Experts hosted by `device`, ascending.
  absl::Span<const int32_t> experts_on(int32_t device) const;
  // [n_routed]: the table router::PlanDispatch takes as expert_to_shard.
  absl::Span<const int32_t> expert_to_device() const { return expert_to_device_; }
  // The fewest experts any `max_devices` devices host together (the sum of the smallest
  // device sizes): device-limited routing can always fill num_experts_per_tok iff this is >= it.
  int64_t MinExpertsOn(int32_t max_devices) const;

  // InvalidArgument unless the placement covers exactly config.n_routed_experts experts.
  absl::Status ValidateFor(const model::ModelConfig& config) const;

 private:
  ExpertPlacement() = default;

  int32_t num_devices_ = 0;
  std::vector<int32_t> expert_to_device_;  // [n_routed]
  std::vector<int32_t> offsets_;           // [num_devices + 1] into by_device_
  std::vector<int32_t> by_device_;         // [n_routed] experts grouped by device, ascending
};

// How a device's affinity to a token is scored when picking its M devices.
enum class DeviceAffinity {
  // The best selection score among the device's candidate experts. DeepSeek-V2's paper
  // ("Device-Limited Routing"): "we first select M devices that have experts with the highest
  // affinity scores in them" — a device is worth as much as its best expert; this is also how
  // V2's group_limited_greedy scores groups. The default.
  kMaxExpert,
  // The sum of the device's best ceil(k / M) candidate scores: DeepSeek-V3's paper, node-limited
  // routing ("the sum of the highest K_r / M affinity scores of the experts distributed on each
  // node"), what V3's noaux_tc does for groups. Prefers devices that can supply several of the
  // token's experts. A device with fewer candidates sums the ones it has.
  kSumTopExperts,
};

// DeviceLimitedTopK: the model's top-k for one token, restricted to at most `max_devices`
// devices.
//
//   scores    [n_routed]  gate scores after softmax/sigmoid, unbiased (engine::GateScores)
//   bias      [n_routed]  or empty: selection bias (checkpoint e_score_correction_bias plus the
//                         balancer's), applied exactly when engine::SelectExperts applies it
//                         (noaux_tc models)
//   returns   ExpertChoice{experts [k], weights [k]}, k = num_experts_per_tok
//
// Optimises: the model's own selection objective (highest biased score, within the model's
// group limit) subject to touching at most M devices. Steps:
//   1. The model's ranking, from engine::SelectExperts itself: its group limit (greedy: none;
//      group_limited_greedy: groups by max; noaux_tc: groups by top-2 sum, on biased scores)
//      decides the candidate experts. The group limit comes FIRST because it is the model's
//      trained behaviour: a device is never picked for an expert the model would not consider,
//      and when the device limit does not bind the answer is exactly the model's.
//   2. The M devices with the highest affinity (see DeviceAffinity) over their candidates; ties
//      towards the lower device index.
//   3. The model's top-k among the candidates on those devices, in the model's order (biased
//      score descending, ties towards the lower expert). Should those devices hold fewer than k
//      candidates (only when groups and devices do not line up), the rest come from their
//      non-candidate experts in the model's order (as SelectExperts itself does when masking
//      leaves too few): the device bound is never broken.
//   4. Gate weights from the UNBIASED scores of the chosen experts, normalised when
//      norm_topk_prob (and k > 1), times routed_scaling_factor — as SelectExperts.
// With max_devices >= number of devices the result is exactly engine::SelectExperts's.
//
// InvalidArgument for mismatched sizes, a non-finite score or bias, an invalid group
// configuration, max_devices < 1, or a placement where some max_devices devices host fewer than
// k experts together. Cost: one SelectExperts over all n experts (O(n log n)) plus O(n + D log D).
absl::StatusOr<engine::ExpertChoice> DeviceLimitedTopK(
    const model::ModelConfig& config, absl::Span<const float> scores, absl::Span<const float> bias,
    const ExpertPlacement& placement, int32_t max_devices,
    DeviceAffinity affinity = DeviceAffinity::kMaxExpert);

// Distinct devices hosting `experts` (what a token costs in dispatch messages).
int32_t DevicesTouched(absl::Span<const int32_t> experts, const ExpertPlacement& placement);

struct LoadBalancerOptions {
  // Bias update speed (DeepSeek-V3 used 0.001 in training). At serving time it trades reaction
  // speed against oscillation: the bias moves by exactly gamma per Rebalance().
  float gamma = 1e-3f;
  // After every update the bias is shifted to zero mean (it cannot drift as a whole: only
  // differences between experts change the selection), then clamped to [-bound, bound]
  // (0: unbounded).
  bool recenter = true;
  float bound = 0.0f;
};

// Auxiliary-loss-free load balancing (DeepSeek-V3's paper) at serving time, for one MoE
// layer. The router records each batch's selected experts; Rebalance() closes the window (the
// tokens since the last Rebalance()) and moves every expert's bias
//
//   b_i += gamma * sign(mean_load - load_i)      mean_load = window assignments / n_routed
//
// so overloaded experts become less attractive and idle ones more. The bias is for selection
// only (added to the checkpoint's e_score_correction_bias through SelectionBias()); gate weights
// always come from the unbiased scores. Only noaux_tc models select with a bias, so Create()
// refuses the others. Not thread-safe (see the file comment).
class ExpertLoadBalancer {
 public:
  // InvalidArgument unless config is a noaux_tc model with routed experts, gamma is finite and
  // positive and bound finite and >= 0.
  static absl::StatusOr<ExpertLoadBalancer> Create(const model::ModelConfig& config,
                                                   LoadBalancerOptions options = {});

  // Counts one batch's selections: the experts of any number of tokens, flattened. Nothing is
  // counted (InvalidArgument) if any id is out of range.
  absl::Status Record(absl::Span<const int32_t> experts);
  absl::Status Record(absl::Span<const engine::ExpertChoice> choices);
  // Counts `load[e]` assignments of every expert at once (load [n_routed]); InvalidArgument for
  // another size.
  absl::Status RecordLoads(absl::Span<const uint64_t> load);

  // Applies the update rule to the current window (then re-centres and clamps, as the options
  // say) and opens a new one. An empty window changes nothing.
  void Rebalance();
  // Back to zero bias and an empty window.
  void Reset();

  // The balancer's own bias [n_routed] (starts at zero).
  absl::Span<const float> bias() const { return bias_; }
  // checkpoint_bias [n_routed] (or empty: zeros) + bias(): what DeviceLimitedTopK takes.
  // InvalidArgument for a checkpoint bias of another size.
  absl::StatusOr<std::vector<float>> SelectionBias(absl::Span<const float> checkpoint_bias) const;
  // Assignments per expert in the open window [n_routed], and their total.
  absl::Span<const int64_t> window_load() const { return window_load_; }
  int64_t window_assignments() const { return window_assignments_; }
  int64_t rebalances() const { return rebalances_; }

 private:
  ExpertLoadBalancer(int64_t n_routed, LoadBalancerOptions options);

  LoadBalancerOptions options_;
  std::vector<float> bias_;           // [n_routed]
  std::vector<int64_t> window_load_;  // [n_routed]
  int64_t window_assignments_ = 0;
  int64_t rebalances_ = 0;
};

}  // namespace splitmoe::routing

#endif  // SPLITMOE_COMMON_ROUTING_EXPERT_ROUTING_H_
