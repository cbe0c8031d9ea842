#include "expert_service/placement_loader.h"
#include "common/base/log.h"

#include <iostream>
#include <memory>
#include <set>

namespace splitmoe::expert_service {

std::function<bool(int64_t, int64_t)> PlacementFilter(const v1::Placement& placement,
                                                      const ShardSpec& spec,
                                                      int64_t n_routed_experts) {
  std::map<int64_t, std::vector<bool>> listed;
  for (const v1::LayerPlacement& l : placement.layers()) {
    std::vector<bool>& holds = listed[l.layer()];
    holds.assign(static_cast<size_t>(n_routed_experts), false);
    for (int e = 0; e < l.experts_size() && e < n_routed_experts; ++e) {
      for (int32_t s : l.experts(e).shards()) {
        if (s == spec.shard) holds[static_cast<size_t>(e)] = true;
      }
    }
  }
  const std::vector<int32_t> contiguous = ShardExperts(n_routed_experts, spec);
  const int64_t first = contiguous.empty() ? 0 : contiguous.front();
  const int64_t last = contiguous.empty() ? -1 : contiguous.back();
  return [listed = std::move(listed), first, last](int64_t layer, int64_t e) {
    auto it = listed.find(layer);
    if (it == listed.end()) return e >= first && e <= last;
    return e >= 0 && static_cast<size_t>(e) < it->second.size() && it->second[e];
  };
}

PlacementLoader::PlacementLoader(std::string model_dir, ShardSpec spec, int64_t n_routed_experts,
                                 const expert_plane::RoutingTableWatcher* table,
                                 runtime::ActorRef<ExpertsActor::Message> experts,
                                 absl::Duration retire_after)
    : model_dir_(std::move(model_dir)),
      spec_(spec),
      n_routed_experts_(n_routed_experts),
      table_(table),
      experts_(std::move(experts)),
      retire_after_(retire_after) {
  held_->wanted[0] = absl::InfiniteFuture();
  thread_ = std::thread([this] { Loop(); });
}

PlacementLoader::~PlacementLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::vector<uint64_t> PlacementLoader::Ready() const {
  std::lock_guard<std::mutex> lock(held_->mu);
  std::vector<uint64_t> out;
  for (const auto& [id, wanted] : held_->wanted) out.push_back(id);
  return out;
}

void PlacementLoader::Loop() {
  absl::Time retry_after = absl::InfinitePast();
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stopping_; });
      if (stopping_) return;
    }
    std::shared_ptr<const v1::RoutingTable> table = table_->Current();
    if (table == nullptr) continue;
    const absl::Time now = absl::Now();
    std::vector<const v1::Placement*> wanted;
    if (table->placement().id() != 0) wanted.push_back(&table->placement());
    if (table->next_placement().id() != 0) wanted.push_back(&table->next_placement());
    std::set<uint64_t> wanted_ids = {0};
    for (const v1::Placement* p : wanted) wanted_ids.insert(p->id());
    std::vector<uint64_t> retire;
    std::vector<const v1::Placement*> load;
    {
      std::lock_guard<std::mutex> lock(held_->mu);
      for (auto& [id, last_wanted] : held_->wanted) {
        if (wanted_ids.count(id)) {
          if (id != 0) last_wanted = now;
          held_->retiring.erase(id);
        } else if (now - last_wanted > retire_after_) {
          auto asked = held_->retiring.find(id);
          // One question at a time, and again only after another grace.
          if (asked == held_->retiring.end() || now - asked->second > retire_after_) {
            held_->retiring[id] = now;
            retire.push_back(id);
          }
        }
      }
      for (const v1::Placement* p : wanted) {
        if (!held_->wanted.count(p->id())) load.push_back(p);
      }
    }
    for (uint64_t id : retire) {
      const int shard = spec_.shard;
      experts_.Send(RetirePlacement{id, retire_after_, [held = held_, id, shard](absl::StatusOr<bool> gone) {
        if (!gone.ok() || !*gone) return;  // still used (or stopping): asked again later
        std::lock_guard<std::mutex> lock(held->mu);
        held->wanted.erase(id);
        held->retiring.erase(id);
        SPLITMOE_LOG(INFO, "expert").With("shard", shard).With("placement", id)
            << "placement retired";
      }});
    }
    if (load.empty() || now < retry_after) continue;
    for (const v1::Placement* p : load) {
      const absl::Time start = absl::Now();
      absl::StatusOr<std::unique_ptr<ExpertShard>> shard = ExpertShard::LoadPlaced(
          model_dir_, spec_, PlacementFilter(*p, spec_, n_routed_experts_));
      if (!shard.ok()) {
        SPLITMOE_LOG(ERROR, "expert").With("shard", spec_.shard).With("placement", p->id())
            << "cannot load placement (retrying in 1 s): " << shard.status();
        retry_after = absl::Now() + absl::Seconds(1);
        break;
      }
      const uint64_t bytes = (*shard)->resident_bytes();
      // Installed before it is reported ready: a batch planned with it finds its experts.
      experts_.Send(InstallPlacement{p->id(), std::shared_ptr<const ExpertShard>(std::move(*shard))});
      {
        std::lock_guard<std::mutex> lock(held_->mu);
        held_->wanted[p->id()] = absl::Now();
      }
      SPLITMOE_LOG(INFO, "expert").With("shard", spec_.shard).With("placement", p->id())
              .With("mib", bytes >> 20)
              .With("took", absl::FormatDuration(
                                absl::Trunc(absl::Now() - start, absl::Milliseconds(1))))
          << "placement loaded";
    }
  }
}

}  // namespace splitmoe::expert_service
