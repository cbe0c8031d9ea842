// Registration: a worker's membership in the cluster. Start() registers with the router
// (retrying until it answers or the timeout passes), then a heartbeat thread reports the
// worker's load every interval the router asked for and registers again if the router has
// forgotten the worker (it missed too many beats). The destructor deregisters (drain) and joins.
// The load callback runs on the heartbeat thread and must be cheap and thread-safe.
// Beside the heartbeats, a registered worker holds a Registry.Attach stream open: when its
// process dies the kernel closes the connection and the router takes it out of service at that
// moment. A broken Attach is opened again by the heartbeat thread.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto membership, Registration::Start(router, request, [&] { return
//   Load(); }));
#ifndef SPLITMOE_COMMON_RPC_REGISTRATION_H_
#define SPLITMOE_COMMON_RPC_REGISTRATION_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::rpc {

class Registration {
 public:
  using LoadFn = std::function<v1::WorkerLoad()>;
  static absl::StatusOr<std::unique_ptr<Registration>> Start(
      const std::string& router_address, v1::RegisterRequest request, LoadFn load,
      absl::Duration timeout = absl::Seconds(60));
  ~Registration();
  std::string worker_id() const;

 private:
  Registration() = default;
  class AttachStream;
  absl::Status RegisterOnce();
  void HeartbeatLoop();
  // (Re)opens the Attach stream for the current worker id. Not under mu_.
  void Reattach();

  v1::RegisterRequest request_;
  LoadFn load_;
  std::unique_ptr<v1::Registry::Stub> stub_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::string worker_id_;
  absl::Duration interval_ = absl::Milliseconds(500);
  std::thread thread_;
  std::unique_ptr<AttachStream> attach_;  // heartbeat thread (and the destructor after it)
};

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_REGISTRATION_H_
