// RoutingTableWatcher: a worker's copy of the router's routing table (placement of experts on
// shards, the pools of live replicas, the device limit, the online bias). One thread keeps a
// Registry.WatchRoutingTable stream open and swaps in every version the router publishes. When
// the router goes away the last table stays in force (workers keep serving without it) and the
// thread subscribes again with back-off until the router is back; a table from a restarted
// router (another router_id) replaces the old one whatever its version.
//
// Current() may be called from any thread and never blocks on the network.
//
//   auto watcher = RoutingTableWatcher::Start("10.0.0.1:7000", "decode-3");
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

#include "absl/time/time.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::expert_plane {

class RoutingTableWatcher {
 public:
  static std::unique_ptr<RoutingTableWatcher> Start(const std::string& router_address,
                                                    std::string worker_id = "");
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

  std::string router_address_;
  std::string worker_id_;
  std::unique_ptr<v1::Registry::Stub> stub_;
  std::thread thread_;

  mutable std::mutex mu_;  // guards everything below
  mutable std::condition_variable cv_;
  std::shared_ptr<const v1::RoutingTable> table_;
  grpc::ClientContext* open_ = nullptr;  // the stream being read, cancelled by the destructor
  bool stopping_ = false;
};

}  // namespace splitmoe::expert_plane

#endif  // SPLITMOE_COMMON_EXPERT_PLANE_ROUTING_TABLE_WATCHER_H_
