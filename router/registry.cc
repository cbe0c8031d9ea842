#include "router/registry.h"

#include <algorithm>
#include <functional>
#include <iostream>
#include <set>

#include "common/base/log.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/mix64.h"
#include "common/base/status_macros.h"
#include "common/routing/eplb.h"

namespace splitmoe::router {

double MaxVio(const std::vector<uint64_t>& load) {
  uint64_t total = 0, most = 0;
  for (uint64_t l : load) {
    total += l;
    most = std::max(most, l);
  }
  if (total == 0 || load.empty()) return 0.0;
  return static_cast<double>(most) * static_cast<double>(load.size()) /
             static_cast<double>(total) -
         1.0;
}

namespace {

// Mean MaxVio over the layers that saw any load.
double MeanMaxVio(const std::vector<std::vector<uint64_t>>& layers) {
  double sum = 0;
  int n = 0;
  for (const auto& l : layers) {
    uint64_t total = 0;
    for (uint64_t v : l) total += v;
    if (total == 0) continue;
    sum += MaxVio(l);
    ++n;
  }
  return n == 0 ? 0.0 : sum / n;
}

}  // namespace

absl::StatusOr<WorkerRegistry> WorkerRegistry::Create(const model::ModelConfig& config,
                                                      absl::Duration heartbeat_interval,
                                                      int missed_allowed,
                                                      std::string model_fingerprint,
                                                      RoutingOptions routing) {
  WorkerRegistry r;
  r.config_ = config;
  r.heartbeat_interval_ = heartbeat_interval;
  r.missed_allowed_ = missed_allowed;
  r.model_fingerprint_ = std::move(model_fingerprint);
  if (routing.max_devices < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-devices must be >= 0, got ", routing.max_devices));
  }
  const int64_t layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  r.expert_tokens_.resize(static_cast<size_t>(layers));
  for (int64_t l = 0; l < layers; ++l) {
    if (config.IsMoeLayer(l))
      r.expert_tokens_[static_cast<size_t>(l)].assign(static_cast<size_t>(config.n_routed_experts), 0);
  }
  r.window_start_ = r.expert_tokens_;
  if (routing.bias_update_rate != 0.0f) {
    if (!(routing.bias_update_rate > 0.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("--bias-update-rate must be >= 0, got ",
                                                     routing.bias_update_rate));
    }
    routing::LoadBalancerOptions o{.gamma = routing.bias_update_rate,
                                   .recenter = true,
                                   .bound = routing.bias_bound};
    for (int64_t l = 0; l < layers; ++l) {
      if (!config.IsMoeLayer(l)) continue;
      absl::StatusOr<routing::ExpertLoadBalancer> b = routing::ExpertLoadBalancer::Create(config, o);
      if (!b.ok()) {
        return absl::Status(b.status().code(),
                            absl::StrCat("--bias-update-rate: ", b.status().message()));
      }
      r.balancers_.push_back(std::move(*b));
      r.balancer_layer_.push_back(static_cast<int32_t>(l));
    }
  }
  if (!routing.router_id.empty()) {
    r.id_suffix_ = absl::StrCat(
        ".", absl::Hex(Mix64(std::hash<std::string>()(routing.router_id)) & 0xfffff,
                       absl::kZeroPad5));
  }
  r.routing_ = std::move(routing);
  r.table_.set_router_id(r.routing_.router_id);
  r.table_.set_max_devices(r.routing_.max_devices);
  r.table_.mutable_expert_to_shard()->Resize(static_cast<int>(config.n_routed_experts), -1);
  return r;
}

absl::StatusOr<v1::RegisterResponse> WorkerRegistry::Register(const v1::RegisterRequest& r,
                                                              absl::Time now) {
  if (r.role() == v1::WORKER_ROLE_UNSPECIFIED)
    return absl::InvalidArgumentError("worker role missing");
  if (r.address().empty()) return absl::InvalidArgumentError("worker address missing");
  if (!model_fingerprint_.empty() && r.model_fingerprint() != model_fingerprint_) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker at ", r.address(),
                     " serves another model (config, tokenizer or weights differ)"));
  }
  const int64_t n = config_.n_routed_experts;
  for (int32_t e : r.experts()) {
    if (e < 0 || e >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker at ", r.address(), " claims expert ", e));
    }
  }
  if (r.role() == v1::WORKER_ROLE_EXPERT) {
    if (r.shard() < 0 || r.shard() >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert service at ", r.address(), " claims shard ", r.shard()));
    }
    std::vector<int32_t> experts(r.experts().begin(), r.experts().end());
    std::sort(experts.begin(), experts.end());
    auto known = shard_experts_.find(r.shard());
    if (known != shard_experts_.end() && known->second != experts) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expert service at ", r.address(), " joins shard ", r.shard(), " with experts [",
          absl::StrJoin(experts, ","), "], but the shard's pool hosts [",
          absl::StrJoin(known->second, ","), "]"));
    }
    for (const auto& [shard, hosted] : shard_experts_) {
      if (shard == r.shard()) continue;
      for (int32_t e : experts) {
        if (std::binary_search(hosted.begin(), hosted.end(), e)) {
          return absl::FailedPreconditionError(
              absl::StrCat("expert service at ", r.address(), " (shard ", r.shard(),
                           ") claims expert ", e, ", which shard ", shard, " hosts"));
        }
      }
    }
    if (!shard_experts_.count(r.shard()) &&
        (placement_.id() != 0 || next_placement_.id() != 0)) {
      // A placement was computed for the shards there were; with another one it may no longer
      // fit (its mode, a device limit that now binds): back to the default placement.
      SPLITMOE_LOG(WARNING, "router").With("shard", r.shard())
              .With("placement", std::max(placement_.id(), next_placement_.id()))
          << "a shard joined that the placement was not made for: back to the default placement";
      placement_.Clear();
      next_placement_.Clear();
      shard_tokens_at_switch_.clear();
      placement_progress_ = true;
    }
    shard_experts_[r.shard()] = std::move(experts);
  }
  Worker w;
  // Ids carry the router's incarnation: a worker that outlived a previous router can never
  // heartbeat under an id this router gave to another worker.
  w.status.set_worker_id(
      absl::StrCat(v1::WorkerRole_Name(r.role()).substr(12), "-", next_id_++, id_suffix_));
  w.status.set_role(r.role());
  w.status.set_address(r.address());
  w.status.set_shard(r.shard());
  *w.status.mutable_experts() = r.experts();
  w.status.set_healthy(true);
  w.status.set_resident_weight_bytes(r.resident_weight_bytes());
  w.status.set_transfer_mode(r.transfer_mode());
  w.status.set_metrics_url(r.metrics_url());
  w.status.set_device(r.device());
  if (r.role() == v1::WORKER_ROLE_EXPERT) w.ucx_worker_address = r.ucx_worker_address();
  w.last_heartbeat = now;
  v1::RegisterResponse response;
  response.set_worker_id(w.status.worker_id());
  response.set_heartbeat_interval_ms(
      static_cast<int32_t>(absl::ToInt64Milliseconds(heartbeat_interval_)));
  response.set_missed_heartbeats_allowed(missed_allowed_);
  workers_.emplace(w.status.worker_id(), std::move(w));
  return response;
}

v1::HeartbeatResponse WorkerRegistry::Heartbeat(const v1::HeartbeatRequest& r, absl::Time now) {
  v1::HeartbeatResponse response;
  auto it = workers_.find(r.worker_id());
  if (it == workers_.end() || !it->second.status.healthy()) {
    response.set_known(false);  // taken out of service: it must register again
    if (it != workers_.end()) workers_.erase(it);
    return response;
  }
  it->second.last_heartbeat = now;
  v1::WorkerLoad load = r.load();
  if (it->second.status.role() == v1::WORKER_ROLE_EXPERT &&
      !std::equal(load.placements_ready().begin(), load.placements_ready().end(),
                  it->second.status.load().placements_ready().begin(),
                  it->second.status.load().placements_ready().end())) {
    placement_progress_ = true;
  }
  if (load.has_moe()) Accumulate(it->second.status.address(), load.moe());
  load.clear_moe();  // only the totals are kept
  *it->second.status.mutable_load() = std::move(load);
  response.set_known(true);
  return response;
}

void WorkerRegistry::Accumulate(const std::string& address, const v1::MoeStats& stats) {
  v1::MoeStats& last = last_report_[address];
  // Fewer batches than last time: another process at that address (a restart) whose counters
  // started again from zero: everything it reports is new.
  if (stats.batches() < last.batches()) last = v1::MoeStats();
  auto delta = [](uint64_t now, uint64_t before) { return now >= before ? now - before : now; };
  std::map<int32_t, const v1::MoeLayerTokens*> before;
  for (const v1::MoeLayerTokens& l : last.layers()) before[l.layer()] = &l;
  for (const v1::MoeLayerTokens& l : stats.layers()) {
    if (l.layer() < 0 || static_cast<size_t>(l.layer()) >= expert_tokens_.size()) continue;
    std::vector<uint64_t>& total = expert_tokens_[static_cast<size_t>(l.layer())];
    if (static_cast<int64_t>(total.size()) != l.expert_tokens_size()) continue;
    const v1::MoeLayerTokens* b = before.count(l.layer()) ? before[l.layer()] : nullptr;
    for (int e = 0; e < l.expert_tokens_size(); ++e) {
      const uint64_t was = b != nullptr && e < b->expert_tokens_size() ? b->expert_tokens(e) : 0;
      total[static_cast<size_t>(e)] += delta(l.expert_tokens(e), was);
    }
  }
  for (int d = 0; d < stats.devices_touched_size(); ++d) {
    if (devices_per_token_.size() <= static_cast<size_t>(d)) devices_per_token_.resize(d + 1, 0);
    const uint64_t was = d < last.devices_touched_size() ? last.devices_touched(d) : 0;
    devices_per_token_[static_cast<size_t>(d)] += delta(stats.devices_touched(d), was);
  }
  failovers_ += delta(stats.failovers(), last.failovers());
  parts_ucx_ += delta(stats.parts_ucx(), last.parts_ucx());
  parts_grpc_ += delta(stats.parts_grpc(), last.parts_grpc());
  last = stats;
}

void WorkerRegistry::Deregister(const std::string& worker_id) { workers_.erase(worker_id); }

std::vector<std::string> WorkerRegistry::Sweep(absl::Time now) {
  std::vector<std::string> lost;
  const absl::Duration window = heartbeat_interval_ * missed_allowed_;
  for (auto it = workers_.begin(); it != workers_.end();) {
    Worker& w = it->second;
    if (w.status.healthy() && now - w.last_heartbeat > window) {
      w.status.set_healthy(false);
      w.status.clear_load();
      lost.push_back(it->first);
    }
    if (!w.status.healthy() && now - w.last_heartbeat > window + kForgetAfter) {
      it = workers_.erase(it);  // dead: no longer listed
    } else {
      ++it;
    }
  }
  return lost;
}

bool WorkerRegistry::ConnectionLost(const std::string& worker_id) {
  auto it = workers_.find(worker_id);
  if (it == workers_.end() || !it->second.status.healthy()) return false;
  it->second.status.set_healthy(false);
  it->second.status.clear_load();
  return true;
}

bool WorkerRegistry::RefreshTable() {
  v1::RoutingTable next;
  next.set_router_id(routing_.router_id);
  next.set_max_devices(routing_.max_devices);
  next.mutable_expert_to_shard()->Resize(static_cast<int>(config_.n_routed_experts), -1);
  for (const auto& [shard, experts] : shard_experts_) {
    v1::ExpertPool* pool = next.add_pools();
    pool->set_shard(shard);
    *pool->mutable_experts() = {experts.begin(), experts.end()};
    for (int32_t e : experts) next.set_expert_to_shard(e, shard);
  }
  MaybeSwitchPlacement();
  // Replicas serve once they hold the placement in force (a replica that joined after a
  // rebalance loads it first).
  for (const auto& [id, w] : workers_) {  // by worker id: a stable replica order
    if (w.status.role() != v1::WORKER_ROLE_EXPERT || !w.status.healthy()) continue;
    if (!Holds(w.status, placement_.id())) continue;
    for (v1::ExpertPool& pool : *next.mutable_pools()) {
      if (pool.shard() != w.status.shard()) continue;
      v1::ExpertReplica* r = pool.add_replicas();
      r->set_worker_id(id);
      r->set_address(w.status.address());
      r->set_ucx_worker_address(w.ucx_worker_address);
    }
  }
  for (size_t i = 0; i < balancers_.size(); ++i) {
    v1::LayerBias* b = next.add_online_bias();
    b->set_layer(balancer_layer_[i]);
    *b->mutable_bias() = {balancers_[i].bias().begin(), balancers_[i].bias().end()};
  }
  if (placement_.id() != 0) *next.mutable_placement() = placement_;
  if (next_placement_.id() != 0) *next.mutable_next_placement() = next_placement_;
  next.set_version(table_.version());
  if (next.SerializeAsString() == table_.SerializeAsString()) return false;
  next.set_version(table_.version() + 1);
  table_ = std::move(next);
  return true;
}

bool WorkerRegistry::Holds(const v1::WorkerStatus& w, uint64_t placement) {
  if (placement == 0) return true;
  const auto& ready = w.load().placements_ready();
  return std::find(ready.begin(), ready.end(), placement) != ready.end();
}

std::map<int32_t, uint64_t> WorkerRegistry::ShardTokens() const {
  std::map<int32_t, uint64_t> out;
  for (const auto& [shard, experts] : shard_experts_) out[shard] = 0;
  for (const auto& [id, w] : workers_) {
    if (w.status.role() == v1::WORKER_ROLE_EXPERT)
      out[w.status.shard()] += w.status.load().tokens_processed();
  }
  return out;
}

bool WorkerRegistry::MaybeSwitchPlacement() {
  if (next_placement_.id() == 0) return false;
  std::set<int32_t> used, served;
  for (const v1::LayerPlacement& l : next_placement_.layers()) {
    for (const v1::ExpertCopies& c : l.experts()) used.insert(c.shards().begin(), c.shards().end());
  }
  for (const auto& [id, w] : workers_) {
    if (w.status.role() != v1::WORKER_ROLE_EXPERT || !w.status.healthy()) continue;
    if (!Holds(w.status, next_placement_.id())) return false;  // still loading
    served.insert(w.status.shard());
  }
  for (int32_t shard : used) {
    if (!served.count(shard)) return false;
  }
  SPLITMOE_LOG(INFO, "router").With("placement", next_placement_.id())
      << "placement loaded by every expert replica: switching the routing table to it";
  placement_ = std::move(next_placement_);
  next_placement_.Clear();
  shard_tokens_at_switch_ = ShardTokens();
  placement_progress_ = true;
  return true;
}

bool WorkerRegistry::TakePlacementProgress() {
  const bool progress = placement_progress_;
  placement_progress_ = false;
  return progress;
}

absl::StatusOr<v1::RebalanceResponse> WorkerRegistry::Rebalance(const v1::RebalanceRequest& r) {
  const auto n = static_cast<int32_t>(config_.n_routed_experts);
  if (shard_experts_.empty()) {
    return absl::FailedPreconditionError("rebalance: no expert shard has registered");
  }
  const auto shards = static_cast<int32_t>(shard_experts_.size());
  if (shard_experts_.rbegin()->first != shards - 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rebalance: expert shards must be numbered 0..", shards - 1, "; shard ",
        shard_experts_.rbegin()->first, " is registered"));
  }
  if (r.redundant_experts() < 0 || r.redundant_experts() > 64 * n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rebalance: redundant_experts must be in [0, ", 64 * n, "], got ", r.redundant_experts()));
  }
  if (!TableComplete()) {
    return absl::FailedPreconditionError(
        "rebalance: not every expert has a shard with a live replica (a shard still starting?)");
  }
  const int32_t redundant = r.redundant_experts() > 0 ? r.redundant_experts() : std::max(1, n / 8);
  const int32_t slots = (n + redundant + shards - 1) / shards;
  const bool keep_homes = routing_.max_devices > 0 && routing_.max_devices < shards;
  std::vector<int32_t> homes;
  if (keep_homes) homes.assign(table_.expert_to_shard().begin(), table_.expert_to_shard().end());
  for (int32_t h : homes) {
    if (h < 0) return absl::FailedPreconditionError("rebalance: an expert has no shard");
  }
  // The per-layer placement in force, to compare against.
  std::map<int32_t, routing::LayerPlacement> current;
  for (const v1::LayerPlacement& l : placement_.layers()) {
    routing::LayerPlacement p;
    p.shard_experts.resize(static_cast<size_t>(shards));
    p.expert_shards.resize(static_cast<size_t>(n));
    for (int32_t e = 0; e < std::min(n, l.experts_size()); ++e) {
      for (int32_t s : l.experts(e).shards()) {
        if (s < 0 || s >= shards) continue;
        p.expert_shards[static_cast<size_t>(e)].push_back(s);
        p.shard_experts[static_cast<size_t>(s)].push_back(e);
      }
    }
    current[l.layer()] = std::move(p);
  }
  routing::LayerPlacement by_table;
  by_table.expert_shards.resize(static_cast<size_t>(n));
  by_table.shard_experts.resize(static_cast<size_t>(shards));
  for (int32_t e = 0; e < n && e < table_.expert_to_shard_size(); ++e) {
    const int32_t s = table_.expert_to_shard(e);
    if (s < 0 || s >= shards) continue;
    by_table.expert_shards[static_cast<size_t>(e)].push_back(s);
    by_table.shard_experts[static_cast<size_t>(s)].push_back(e);
  }
  v1::RebalanceResponse response;
  response.set_mode(keep_homes ? "homes kept" : "packed");
  v1::Placement* out = response.mutable_placement();
  double before = 0, after = 0;
  int layers = 0;
  for (size_t l = 0; l < expert_tokens_.size(); ++l) {
    if (expert_tokens_[l].empty()) continue;
    const std::vector<double> load(expert_tokens_[l].begin(), expert_tokens_[l].end());
    SPLITMOE_ASSIGN_OR_RETURN(routing::LayerPlacement p,
                              routing::BalancedPlacement(load, shards, slots, homes));
    auto cur = current.find(static_cast<int32_t>(l));
    before += routing::ExpectedMaxVio(load, cur != current.end() ? cur->second : by_table);
    after += routing::ExpectedMaxVio(load, p);
    ++layers;
    v1::LayerPlacement* lp = out->add_layers();
    lp->set_layer(static_cast<int32_t>(l));
    for (const std::vector<int32_t>& copies : p.expert_shards)
      *lp->add_experts()->mutable_shards() = {copies.begin(), copies.end()};
  }
  if (layers == 0) return absl::FailedPreconditionError("rebalance: the model has no MoE layer");
  response.set_expected_max_vio_before(before / layers);
  response.set_expected_max_vio_after(after / layers);
  if (r.dry_run()) return response;
  // Ids differ across router incarnations, so a replica never mistakes an old router's
  // placement for this one's.
  out->set_id((std::hash<std::string>{}(routing_.router_id) & 0xffffffffULL) << 20 |
              ++placements_issued_);
  next_placement_ = *out;
  placement_progress_ = true;
  return response;
}

bool WorkerRegistry::TableComplete() const {
  for (int32_t s : table_.expert_to_shard()) {
    if (s < 0) return false;
  }
  for (const v1::ExpertPool& pool : table_.pools()) {
    if (pool.replicas_size() == 0) return false;
  }
  return !table_.pools().empty();
}

std::string WorkerRegistry::NotReadyReason() const {
  std::vector<std::string> missing;
  if (Healthy(v1::WORKER_ROLE_PREFILL).empty()) missing.push_back("no prefill worker serving");
  if (Healthy(v1::WORKER_ROLE_DECODE).empty()) missing.push_back("no decode worker serving");
  if (table_.expert_to_shard_size() > 0) {
    std::vector<std::string> shards;
    for (const v1::ExpertPool& pool : table_.pools()) {
      if (pool.replicas_size() == 0) shards.push_back(absl::StrCat(pool.shard()));
    }
    int32_t unclaimed = 0;
    for (int32_t s : table_.expert_to_shard()) unclaimed += s < 0 ? 1 : 0;
    if (!shards.empty()) {
      missing.push_back(absl::StrCat("expert shard(s) ", absl::StrJoin(shards, ","),
                                     " without a live replica"));
    }
    if (unclaimed > 0) {
      missing.push_back(absl::StrCat(unclaimed, " routed expert(s) hosted by no expert shard"));
    }
  }
  return absl::StrJoin(missing, "; ");
}

void WorkerRegistry::CloseBalancingWindow() {
  std::vector<std::vector<uint64_t>> window(expert_tokens_.size());
  for (size_t l = 0; l < expert_tokens_.size(); ++l) {
    window[l].resize(expert_tokens_[l].size());
    for (size_t e = 0; e < expert_tokens_[l].size(); ++e)
      window[l][e] = expert_tokens_[l][e] - window_start_[l][e];
  }
  bool any = false;
  for (const auto& l : window) {
    for (uint64_t v : l) any |= v > 0;
  }
  if (!any) return;  // no traffic: nothing to learn from
  max_vio_window_ = MeanMaxVio(window);
  window_start_ = expert_tokens_;
  if (balancers_.empty()) return;
  for (size_t i = 0; i < balancers_.size(); ++i) {
    (void)balancers_[i].RecordLoads(window[static_cast<size_t>(balancer_layer_[i])]);
    balancers_[i].Rebalance();
  }
  ++bias_updates_;
}

void WorkerRegistry::ResetBias() {
  for (routing::ExpertLoadBalancer& b : balancers_) b.Reset();
}

std::vector<const v1::WorkerStatus*> WorkerRegistry::Healthy(v1::WorkerRole role) const {
  std::vector<const v1::WorkerStatus*> out;
  for (const auto& [id, w] : workers_) {
    if (w.status.role() == role && w.status.healthy()) out.push_back(&w.status);
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const v1::WorkerStatus* a, const v1::WorkerStatus* b) {
                     return a->load().requests_in_flight() < b->load().requests_in_flight();
                   });
  return out;
}

v1::ClusterStatusResponse WorkerRegistry::Status(absl::Time now) const {
  v1::ClusterStatusResponse response;
  for (const auto& [id, w] : workers_) {
    v1::WorkerStatus* s = response.add_workers();
    *s = w.status;
    s->set_last_heartbeat_age_ms(absl::ToDoubleMilliseconds(now - w.last_heartbeat));
    response.set_requests_in_flight(response.requests_in_flight() +
                                    w.status.load().requests_in_flight());
  }
  response.set_launcher_address(routing_.launcher_address);
  v1::RoutingStatus* routing = response.mutable_routing();
  routing->set_table_version(table_.version());
  routing->set_max_devices(routing_.max_devices);
  routing->set_max_vio(MeanMaxVio(expert_tokens_));
  routing->set_max_vio_window(max_vio_window_);
  for (size_t l = 0; l < expert_tokens_.size(); ++l) {
    if (expert_tokens_[l].empty()) continue;
    v1::MoeLayerTokens* t = routing->add_expert_tokens();
    t->set_layer(static_cast<int32_t>(l));
    *t->mutable_expert_tokens() = {expert_tokens_[l].begin(), expert_tokens_[l].end()};
  }
  std::map<int32_t, const routing::ExpertLoadBalancer*> bias;
  for (size_t i = 0; i < balancers_.size(); ++i) bias[balancer_layer_[i]] = &balancers_[i];
  for (size_t l = 0; l < expert_tokens_.size(); ++l) {
    if (expert_tokens_[l].empty()) continue;
    v1::LayerBias* b = routing->add_expert_bias();
    b->set_layer(static_cast<int32_t>(l));
    auto it = bias.find(static_cast<int32_t>(l));
    if (it != bias.end()) {
      *b->mutable_bias() = {it->second->bias().begin(), it->second->bias().end()};
    } else {
      b->mutable_bias()->Resize(static_cast<int>(config_.n_routed_experts), 0.0f);
    }
  }
  *routing->mutable_devices_per_token() = {devices_per_token_.begin(), devices_per_token_.end()};
  for (size_t d = 0; d < devices_per_token_.size(); ++d) {
    if (devices_per_token_[d] > 0) routing->set_max_devices_observed(static_cast<int32_t>(d));
  }
  routing->set_bias_update_rate(routing_.bias_update_rate);
  routing->set_failovers(failovers_);
  routing->set_expert_parts_ucx(parts_ucx_);
  routing->set_expert_parts_grpc(parts_grpc_);
  routing->set_bias_updates(bias_updates_);
  routing->set_placement_id(placement_.id());
  routing->set_next_placement_id(next_placement_.id());
  {
    std::vector<uint64_t> since;
    for (const auto& [shard, tokens] : ShardTokens()) {
      auto at = shard_tokens_at_switch_.find(shard);
      const uint64_t base = at != shard_tokens_at_switch_.end() ? at->second : 0;
      since.push_back(tokens > base ? tokens - base : 0);
    }
    routing->set_shard_max_vio(MaxVio(since));
  }
  for (const auto& [shard, experts] : shard_experts_) {
    v1::PoolStatus* pool = response.add_pools();
    pool->set_shard(shard);
    *pool->mutable_experts() = {experts.begin(), experts.end()};
    for (const auto& [id, w] : workers_) {
      if (w.status.role() != v1::WORKER_ROLE_EXPERT || w.status.shard() != shard) continue;
      v1::ReplicaStatus* r = pool->add_replicas();
      r->set_worker_id(id);
      r->set_address(w.status.address());
      r->set_healthy(w.status.healthy());
      r->set_tokens(w.status.load().tokens_processed());
      *r->mutable_placements_ready() = w.status.load().placements_ready();
      r->set_transport(w.ucx_worker_address.empty() ? "grpc" : "ucx");
    }
  }
  return response;
}

}  // namespace splitmoe::router
