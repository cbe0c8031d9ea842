// RoutingTableWatcher: a worker's copy of the router's routing table (placement of experts on
// shards, the pools of live replicas, the device limit, the online bias). One thread keeps a
// Registry.WatchRoutingTable stream open and swaps in every version the router publishes. When
// the router goes away the last table stays in force (workers keep serving without it) and the
// thread subscribes again with back-off until the router is back; a table from a restarted
// router (another router_id) replaces the old one whatever its version.
//
// Several routers (`--router A,B`): the first that answers is followed. One after the first is
// followed only for kRecheckFirst at a time, then the list is tried again from its start, so
// every process of a cluster follows the same router (the first live one) and they all see one
// placement. When the followed router dies, the next one's table takes over at once.
//
// Current() may be called from any thread and never blocks on the network.
//
//   auto watcher = RoutingTableWatcher::Start("10.0.0.1:7000,10.0.0.2:7000", "decode-3");
//   watcher->WaitForTable(absl::Seconds(10));
//   std::shared_ptr<const v1::RoutingTable> table = watcher->Current();  // null before the first
#ifndef SPLITMOE_COMMON_EXPERT_PLANE_ROUTING_TABLE_WATCHER_H_
#define SPLITMOE_COMMON_EXPERT_PLANE_ROUTING_TABLE_WATCHER_H_

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::expert_plane {

class RoutingTableWatcher {
 public:
  // `routers`: one address, or several separated by commas, in order of preference.
  static std::unique_ptr<RoutingTableWatcher> Start(const std::string& routers,
                                                    std::string worker_id = "");
  static constexpr absl::Duration kRecheckFirst = absl::Seconds(3);
  ~RoutingTableWatcher();

  // The table in force; null until the first one arrived.
  std::shared_ptr<const v1::RoutingTable> Current() const;
  // True once a table has arrived (waits at most `timeout`).
  bool WaitForTable(absl::Duration timeout) const;

 private:
  RoutingTableWatcher() = default;
  void Loop();
  // Swaps `table` in unless it is older than the one in force from the same router.
  void Offer(v1::RoutingTable table);

  std::string worker_id_;
  std::vector<std::unique_ptr<v1::Registry::Stub>> stubs_;  // one per router, in order
  std::thread thread_;

  mutable std::mutex mu_;  // guards everything below
  mutable std::condition_variable cv_;
  std::shared_ptr<const v1::RoutingTable> table_;
  grpc::ClientContext* open_ = nullptr;  // the stream being read, cancelled by the destructor
  bool stopping_ = false;
};

}  // namespace splitmoe::expert_plane

#endif  // SPLITMOE_COMMON_EXPERT_PLANE_ROUTING_TABLE_WATCHER_H_
