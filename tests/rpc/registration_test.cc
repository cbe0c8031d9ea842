// Membership (a worker's registration with every router of a cluster) against fake Registry
// services over real gRPC on loopback: a router that is down at the start is joined when it comes
// up, a restarted router (which forgot the worker) gets it back, a refusal fails the start at
// once, and the end deregisters from every router.
#include "common/rpc/registration.h"

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/rpc/rpc.h"
#include "gtest/gtest.h"

namespace splitmoe::rpc {
namespace {

// A router's Registry as far as a worker sees it. `refuse` turns every Register down; Forget()
// is a restart (every id unknown from then on).
class FakeRegistry final : public v1::Registry::CallbackService {
 public:
  explicit FakeRegistry(std::string name, absl::Status refuse = absl::OkStatus())
      : name_(std::move(name)), refuse_(std::move(refuse)) {}

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* ctx,
                                     const v1::RegisterRequest*,
                                     v1::RegisterResponse* response) override {
    auto* reactor = ctx->DefaultReactor();
    if (!refuse_.ok()) {
      reactor->Finish(ToGrpcStatus(refuse_));
      return reactor;
    }
    std::lock_guard<std::mutex> lock(mu_);
    const std::string id = absl::StrCat(name_, "-", ++registrations_);
    known_.insert(id);
    response->set_worker_id(id);
    response->set_heartbeat_interval_ms(50);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override {
    std::lock_guard<std::mutex> lock(mu_);
    response->set_known(known_.count(request->worker_id()) > 0);
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerUnaryReactor* Deregister(grpc::CallbackServerContext* ctx,
                                       const v1::DeregisterRequest* request,
                                       v1::DeregisterResponse*) override {
    std::lock_guard<std::mutex> lock(mu_);
    deregistered_.push_back(request->worker_id());
    known_.erase(request->worker_id());
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  // Held open until the worker ends it (or the server stops).
  grpc::ServerWriteReactor<v1::AttachEvent>* Attach(grpc::CallbackServerContext*,
                                                    const v1::AttachRequest*) override {
    struct Held : grpc::ServerWriteReactor<v1::AttachEvent> {
      void OnCancel() override { Finish(grpc::Status::CANCELLED); }
      void OnDone() override { delete this; }
    };
    return new Held();
  }

  void Forget() {
    std::lock_guard<std::mutex> lock(mu_);
    known_.clear();
  }
  int registrations() {
    std::lock_guard<std::mutex> lock(mu_);
    return registrations_;
  }
  std::vector<std::string> deregistered() {
    std::lock_guard<std::mutex> lock(mu_);
    return deregistered_;
  }

 private:
  const std::string name_;
  const absl::Status refuse_;
  std::mutex mu_;
  int registrations_ = 0;
  std::set<std::string> known_;
  std::vector<std::string> deregistered_;
};

// A loopback address nothing listens on now (the port of a server started and stopped).
std::string FreeAddress() {
  FakeRegistry unused("unused");
  absl::StatusOr<RunningServer> s = StartServer("127.0.0.1:0", {&unused});
  EXPECT_TRUE(s.ok()) << s.status();
  const std::string address = s->address;
  s->server->Shutdown(std::chrono::system_clock::now());
  return address;
}

v1::RegisterRequest Request() {
  v1::RegisterRequest r;
  r.set_role(v1::WORKER_ROLE_DECODE);
  r.set_address("127.0.0.1:9");
  return r;
}

bool WaitFor(const std::function<bool()>& done, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time end = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > end) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

TEST(MembershipTest, ARouterDownAtTheStartIsJoinedWhenItComesUp) {
  FakeRegistry a("A"), b("B");
  absl::StatusOr<RunningServer> server_a = StartServer("127.0.0.1:0", {&a});
  ASSERT_TRUE(server_a.ok()) << server_a.status();
  const std::string b_address = FreeAddress();
  std::atomic<int> loads{0};
  absl::StatusOr<std::unique_ptr<Membership>> m = Membership::Start(
      RouterAddresses(server_a->address + "," + b_address), Request(), [&] {
        ++loads;
        return v1::WorkerLoad();
      });
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->worker_ids(), (std::vector<std::string>{"A-1", ""}));

  absl::StatusOr<RunningServer> server_b = StartServer(b_address, {&b});
  ASSERT_TRUE(server_b.ok()) << server_b.status();
  ASSERT_TRUE(WaitFor([&] { return (*m)->worker_ids()[1] == "B-1"; }));
  ASSERT_TRUE(WaitFor([&] { return loads.load() >= 4; })) << "no heartbeats";

  // A router restart: it knows nobody; the next heartbeat registers the worker again.
  a.Forget();
  ASSERT_TRUE(WaitFor([&] { return (*m)->worker_ids()[0] == "A-2"; }));
  EXPECT_EQ(b.registrations(), 1);

  m->reset();  // deregisters from both
  EXPECT_EQ(a.deregistered(), (std::vector<std::string>{"A-2"}));
  EXPECT_EQ(b.deregistered(), (std::vector<std::string>{"B-1"}));
  server_a->server->Shutdown(std::chrono::system_clock::now());
  server_b->server->Shutdown(std::chrono::system_clock::now());
}

TEST(MembershipTest, ARefusalFailsTheStartAtOnce) {
  FakeRegistry refusing("R", absl::FailedPreconditionError("another model"));
  absl::StatusOr<RunningServer> server = StartServer("127.0.0.1:0", {&refusing});
  ASSERT_TRUE(server.ok()) << server.status();
  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<Membership>> m =
      Membership::Start({FreeAddress(), server->address}, Request(),
                        [] { return v1::WorkerLoad(); }, absl::Seconds(30));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition) << m.status();
  EXPECT_NE(m.status().message().find("another model"), std::string::npos) << m.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  server->server->Shutdown(std::chrono::system_clock::now());
}

TEST(MembershipTest, NoRouterAnsweringIsUnavailableAfterTheTimeout) {
  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<Membership>> m =
      Membership::Start({FreeAddress(), FreeAddress()}, Request(), [] { return v1::WorkerLoad(); },
                        absl::Milliseconds(500));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
  EXPECT_NE(m.status().message().find("did not answer"), std::string::npos) << m.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_FALSE(Membership::Start({}, Request(), [] { return v1::WorkerLoad(); }).ok());
  EXPECT_EQ(RouterAddresses(" a:1, ,b:2,"), (std::vector<std::string>{"a:1", "b:2"}));
}

}  // namespace
}  // namespace splitmoe::rpc
