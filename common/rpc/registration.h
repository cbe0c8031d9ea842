// Registration: a worker's membership in the cluster, with one router. Its thread registers
// with the router (retrying until it answers), then reports the worker's load every interval
// the router asked for and registers again if the router has forgotten the worker (it missed
// too many beats, or it restarted). The destructor deregisters (drain) and joins. The load callback runs on the heartbeat thread and must be cheap and
// thread-safe. Beside the heartbeats, a registered worker holds a Registry.Attach stream open:
// when its process dies the kernel closes the connection and the router takes it out of service
// at that moment. A broken Attach is opened again by the heartbeat thread.
//
// Membership: the same with every router of a cluster fronted by several (`--router A,B`): one
// Registration per router, each with its own worker id. Start() returns once one router has the
// worker (a router that is down is joined in the background when it comes up); a refusal by
// any router (another model, bad credentials) fails it.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto membership,
//                             Membership::Start(routers, request, [&] { return Load(); }));
#ifndef SPLITMOE_COMMON_RPC_REGISTRATION_H_
#define SPLITMOE_COMMON_RPC_REGISTRATION_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::rpc {

class Registration {
 public:
  using LoadFn = std::function<v1::WorkerLoad()>;
  // Returns at once; the heartbeat thread registers (every 200 ms until the router answers,
  // and on after a refusal, which state() then reports), then beats.
  static std::unique_ptr<Registration> Start(const std::string& router_address,
                                             v1::RegisterRequest request, LoadFn load);
  ~Registration();
  // Empty until registered.
  std::string worker_id() const;
  // OK once registered; otherwise why not yet (UNAVAILABLE while the router is unreachable).
  absl::Status state() const;
  const std::string& router_address() const { return router_address_; }

 private:
  Registration() = default;
  class AttachStream;
  absl::Status RegisterOnce();
  void HeartbeatLoop();
  // (Re)opens the Attach stream for the current worker id. Not under mu_.
  void Reattach();

  std::string router_address_;
  v1::RegisterRequest request_;
  LoadFn load_;
  std::unique_ptr<v1::Registry::Stub> stub_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::string worker_id_;
  absl::Status state_ = absl::UnavailableError("not registered yet");
  absl::Duration interval_ = absl::Milliseconds(500);
  std::thread thread_;
  std::unique_ptr<AttachStream> attach_;  // heartbeat thread (and the destructor after it)
};

class Membership {
 public:
  // `routers`: at least one address. Waits up to `timeout` for the first registration.
  static absl::StatusOr<std::unique_ptr<Membership>> Start(
      const std::vector<std::string>& routers, v1::RegisterRequest request,
      Registration::LoadFn load, absl::Duration timeout = absl::Seconds(60));
  // Deregisters from every router (each bounded by 2 s).
  ~Membership() = default;
  // The worker's id with each router (empty where not registered yet), in the routers' order.
  std::vector<std::string> worker_ids() const;

 private:
  std::vector<std::unique_ptr<Registration>> registrations_;
};

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_REGISTRATION_H_
