// WorkerRegistry: the router's table of workers — who they are, what they host, when they last
// heartbeated — and the control plane derived from it: the versioned routing table (expert ->
// shard, each shard's pool of live replicas, the device limit, the online bias), the MoE
// statistics the attention workers report (per-layer per-expert tokens, devices touched per
// token) and the online auxiliary-loss-free bias computed from them. Plain state with handlers:
// it is owned by the router's registry actor, which alone calls it (not thread-safe). Time is
// passed in, so tests drive it with a fake clock.
//
//   WorkerRegistry registry(config, absl::Milliseconds(500), /*missed=*/3, fingerprint, {});
//   SPLITMOE_ASSIGN_OR_RETURN(v1::RegisterResponse r, registry.Register(request, now));
//   registry.Sweep(now);                  // takes silent workers out of service
//   if (registry.RefreshTable()) Publish(registry.table());
#ifndef SPLITMOE_ROUTER_REGISTRY_H_
#define SPLITMOE_ROUTER_REGISTRY_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/model/config.h"
#include "common/routing/expert_routing.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::router {

struct RoutingOptions {
  // Device-limited routing: a token's experts on at most this many shards (0: off).
  int32_t max_devices = 0;
  // Online bias: b_i += rate * sign(mean_load - load_i) per window, re-centred, clamped to
  // [-bias_bound, bias_bound]. 0: off (the bias stays zero).
  float bias_update_rate = 0.0f;
  float bias_bound = 1.0f;
  // Written into every table; changes when the router restarts.
  std::string router_id;
  // Shown in status: the Launcher of the `splitmoe up` that runs this cluster, if any.
  std::string launcher_address;
};

class WorkerRegistry {
 public:
  // InvalidArgument (from Create) when the routing options do not fit the model.
  static absl::StatusOr<WorkerRegistry> Create(const model::ModelConfig& config,
                                               absl::Duration heartbeat_interval,
                                               int missed_allowed, std::string model_fingerprint,
                                               RoutingOptions routing = {});

  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& request, absl::Time now);
  v1::HeartbeatResponse Heartbeat(const v1::HeartbeatRequest& request, absl::Time now);
  void Deregister(const std::string& worker_id);
  // Marks workers silent for more than missed_allowed intervals unhealthy; returns their ids.
  // Workers out of service and silent for `kForgetAfter` more are dropped from the listing.
  std::vector<std::string> Sweep(absl::Time now);
  // The worker's connection to the router broke (its Registry.Attach stream ended): out of
  // service at once, its load cleared. True when it was in service.
  bool ConnectionLost(const std::string& worker_id);
  bool Knows(const std::string& worker_id) const { return workers_.count(worker_id) > 0; }
  static constexpr absl::Duration kForgetAfter = absl::Seconds(10);

  // Rebuilds the routing table from the registry; true when it changed (a new version).
  bool RefreshTable();
  const v1::RoutingTable& table() const { return table_; }
  // True when every routed expert has a shard with at least one live replica.
  bool TableComplete() const;
  // Why the cluster cannot serve a request now (no healthy prefill or decode worker, an expert
  // shard without a live replica), or empty when it can: the router's readiness.
  std::string NotReadyReason() const;

  // Closes the balancing window: the online bias moves by the loads reported since the last
  // call (when enabled), and the window's MaxVio is recorded. Call RefreshTable() after.
  void CloseBalancingWindow();
  // Zero bias (e.g. after a placement change).
  void ResetBias();

  // EPLB (routing/eplb.h): a placement of every MoE layer's experts from the loads observed
  // since start, with at least `redundant_experts` extra copies per layer (0: max(1, experts /
  // 8); rounded up so every shard has the same number of slots). FailedPrecondition unless every
  // expert has a live shard. A shard that joins later resets the placement to the default.
  // Unless `dry_run`, it becomes the table's next_placement: expert replicas load it, and the
  // table switches to it once every live replica holds it (MaybeSwitchPlacement). With a device
  // limit below the number of shards, every expert's home stays (only copies are added), so
  // device-limited routing is unchanged. FailedPrecondition without expert shards numbered
  // 0..S-1 or without MoE layers.
  absl::StatusOr<v1::RebalanceResponse> Rebalance(const v1::RebalanceRequest& request);
  // True (once) when a heartbeat changed which placements the expert replicas hold, or the
  // placement in force changed: the table should be refreshed and published.
  bool TakePlacementProgress();

  // Healthy workers of a role, least loaded (requests in flight) first.
  std::vector<const v1::WorkerStatus*> Healthy(v1::WorkerRole role) const;
  v1::ClusterStatusResponse Status(absl::Time now) const;

 private:
  WorkerRegistry() = default;
  struct Worker {
    v1::WorkerStatus status;
    absl::Time last_heartbeat;
    std::string ucx_worker_address;  // expert services: their UCX expert transport
  };
  // Adds what `stats` (cumulative, from the worker at `address`) counts beyond the last report
  // from that address.
  void Accumulate(const std::string& address, const v1::MoeStats& stats);
  // Switches to next_placement_ when every live expert replica holds it and every shard it uses
  // has one; true when it did.
  bool MaybeSwitchPlacement();
  // Whether a live replica holds `placement` (0, the default, always).
  static bool Holds(const v1::WorkerStatus& w, uint64_t placement);
  // Token-expert assignments computed per shard by its replicas now.
  std::map<int32_t, uint64_t> ShardTokens() const;

  model::ModelConfig config_;
  absl::Duration heartbeat_interval_;
  int missed_allowed_ = 3;
  std::string model_fingerprint_;
  RoutingOptions routing_;
  uint64_t next_id_ = 1;
  std::string id_suffix_;  // from the router id: ids differ across router restarts
  std::map<std::string, Worker> workers_;  // by worker id
  // Every shard ever registered and the experts it hosts (kept when its replicas are gone, so
  // its experts stay mapped and requests needing them fail naming the shard).
  std::map<int32_t, std::vector<int32_t>> shard_experts_;

  v1::RoutingTable table_;
  // MoE statistics: totals since start, the last cumulative report per worker address, and the
  // totals when the balancing window last closed.
  std::vector<std::vector<uint64_t>> expert_tokens_;  // [layers][n_routed]; empty: dense
  std::vector<std::vector<uint64_t>> window_start_;
  std::vector<uint64_t> devices_per_token_;
  uint64_t failovers_ = 0;
  uint64_t parts_ucx_ = 0, parts_grpc_ = 0;
  std::map<std::string, v1::MoeStats> last_report_;
  double max_vio_window_ = 0;
  std::vector<routing::ExpertLoadBalancer> balancers_;  // per layer, when the bias is on
  std::vector<int32_t> balancer_layer_;
  uint64_t bias_updates_ = 0;
  // EPLB: the placement in force (id 0: expert_to_shard), the one being loaded, ids issued, the
  // shards' token counts when the placement in force began.
  v1::Placement placement_, next_placement_;
  uint64_t placements_issued_ = 0;
  bool placement_progress_ = false;
  std::map<int32_t, uint64_t> shard_tokens_at_switch_;
};

// MaxVio of one layer's loads: max_i load_i / mean - 1 (0 for no load).
double MaxVio(const std::vector<uint64_t>& load);

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_REGISTRY_H_
