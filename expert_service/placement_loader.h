// PlacementLoader: keeps an expert service holding the EPLB placements its routing table names.
// Its own thread watches the table; for the placement in force and the one announced as next, it
// loads this shard's experts of each (from the checkpoint, off the experts actor) and hands them
// to the actor (InstallPlacement); it then reports the placement ready in the heartbeats, and
// the router switches the table once every replica holds the next placement. A placement
// neither in force nor next for `retire_after` is retired once no batch has used it for that
// long either (the actor decides: an attention worker may still plan with it, e.g. while the
// router is away). The default placement (0) is never retired.
//
//   PlacementLoader loader(dir, spec, watcher.get(), actor.ref());
//   load.set_placements_ready(loader.Ready());   // in the heartbeat
#ifndef SPLITMOE_EXPERT_SERVICE_PLACEMENT_LOADER_H_
#define SPLITMOE_EXPERT_SERVICE_PLACEMENT_LOADER_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "common/expert_plane/routing_table_watcher.h"
#include "common/runtime/actor.h"
#include "expert_service/expert_service.h"
#include "expert_service/expert_shard.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::expert_service {

// Whether shard `spec.shard` holds (layer, expert) under `placement` (layers it does not list:
// the default contiguous placement).
std::function<bool(int64_t, int64_t)> PlacementFilter(const v1::Placement& placement,
                                                      const ShardSpec& spec,
                                                      int64_t n_routed_experts);

class PlacementLoader {
 public:
  // `table` and the actor behind `experts` must outlive the loader.
  PlacementLoader(std::string model_dir, ShardSpec spec, int64_t n_routed_experts,
                  const expert_plane::RoutingTableWatcher* table,
                  runtime::ActorRef<ExpertsActor::Message> experts,
                  absl::Duration retire_after = absl::Seconds(2));
  ~PlacementLoader();

  // The placements held, 0 first. Any thread.
  std::vector<uint64_t> Ready() const;

 private:
  void Loop();

  std::string model_dir_;
  ShardSpec spec_;
  int64_t n_routed_experts_;
  const expert_plane::RoutingTableWatcher* table_;
  runtime::ActorRef<ExpertsActor::Message> experts_;
  absl::Duration retire_after_;
  // Shared with the actor's retire replies, which may come after the loader is gone.
  struct Held {
    std::mutex mu;
    std::map<uint64_t, absl::Time> wanted;   // placement held -> when it was last wanted
    std::map<uint64_t, absl::Time> retiring; // retire asked (at) -> the actor's answer pending
  };
  std::shared_ptr<Held> held_ = std::make_shared<Held>();
  mutable std::mutex mu_;  // guards stopping_
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread thread_;  // last
};

}  // namespace splitmoe::expert_service

#endif  // SPLITMOE_EXPERT_SERVICE_PLACEMENT_LOADER_H_
