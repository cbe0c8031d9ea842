#include "common/rpc/registration.h"

#include <iostream>

#include "common/base/log.h"
#include "absl/strings/str_cat.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"

namespace splitmoe::rpc {

// The worker's end of Registry.Attach: reads (the router writes nothing) until the call ends.
class Registration::AttachStream : public grpc::ClientReadReactor<v1::AttachEvent> {
 public:
  AttachStream(v1::Registry::Stub* stub, const std::string& worker_id) {
    request_.set_worker_id(worker_id);
    stub->async()->Attach(&ctx_, &request_, this);
    StartRead(&event_);
    StartCall();
  }
  ~AttachStream() {
    ctx_.TryCancel();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return done_; });
  }
  bool done() const {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  void OnReadDone(bool ok) override {
    if (ok) StartRead(&event_);
  }
  void OnDone(const grpc::Status& /*status*/) override {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    cv_.notify_all();
  }

 private:
  grpc::ClientContext ctx_;
  v1::AttachRequest request_;
  v1::AttachEvent event_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
};

namespace {

// A refusal (wrong model, bad credentials, bad request) is final; an unreachable router may
// come up later.
bool Final(const absl::Status& status) {
  return !status.ok() && status.code() != absl::StatusCode::kUnavailable &&
         status.code() != absl::StatusCode::kDeadlineExceeded;
}

}  // namespace

std::unique_ptr<Registration> Registration::Start(const std::string& router_address,
                                                  v1::RegisterRequest request, LoadFn load) {
  std::unique_ptr<Registration> r(new Registration());
  r->router_address_ = router_address;
  r->request_ = std::move(request);
  r->load_ = std::move(load);
  r->stub_ = v1::Registry::NewStub(InternalChannel(router_address));
  r->thread_ = std::thread([raw = r.get()] { raw->HeartbeatLoop(); });
  return r;
}

absl::Status Registration::RegisterOnce() {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::RegisterResponse response;
  absl::Status status = FromGrpcStatus(stub_->Register(&context, request_, &response));
  std::lock_guard<std::mutex> lock(mu_);
  if (!status.ok()) {
    if (worker_id_.empty()) state_ = status;
    return status;
  }
  worker_id_ = response.worker_id();
  state_ = absl::OkStatus();
  if (response.heartbeat_interval_ms() > 0)
    interval_ = absl::Milliseconds(response.heartbeat_interval_ms());
  return absl::OkStatus();
}

void Registration::Reattach() {
  attach_.reset();  // ends the old stream first (the router ignores the end of an old id's)
  attach_ = std::make_unique<AttachStream>(stub_.get(), worker_id());
}

std::string Registration::worker_id() const {
  std::lock_guard<std::mutex> lock(mu_);
  return worker_id_;
}

absl::Status Registration::state() const {
  std::lock_guard<std::mutex> lock(mu_);
  return state_;
}

void Registration::HeartbeatLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  absl::StatusCode refused = absl::StatusCode::kOk;  // the last refusal printed
  while (!stopping_) {
    if (worker_id_.empty()) {  // started in the background: register first
      lock.unlock();
      const absl::Status status = RegisterOnce();
      if (status.ok()) {
        Reattach();
        SPLITMOE_LOG(INFO, "membership").With("router", router_address_).With("worker", worker_id())
            << "registered with the router";
      } else if (Final(status) && status.code() != refused) {
        SPLITMOE_LOG(ERROR, "membership").With("router", router_address_)
            << "the router refused this worker: " << status.message();
      }
      refused = status.code();
      lock.lock();
      if (!status.ok()) {
        cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stopping_; });
      }
      continue;
    }
    cv_.wait_for(lock, absl::ToChronoMilliseconds(interval_), [this] { return stopping_; });
    if (stopping_) break;
    v1::HeartbeatRequest beat;
    beat.set_worker_id(worker_id_);
    lock.unlock();
    *beat.mutable_load() = load_();
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::HeartbeatResponse response;
    grpc::Status status = stub_->Heartbeat(&context, beat, &response);
    if (status.ok() && !response.known()) {
      SPLITMOE_LOG(WARNING, "membership").With("router", router_address_)
              .With("worker", beat.worker_id())
          << "the router forgot this worker: registering again";
      if (RegisterOnce().ok()) Reattach();
    } else if (status.ok() && attach_->done()) {
      Reattach();  // the router knows us but the stream broke (e.g. it could not open)
    }
    lock.lock();
  }
}

Registration::~Registration() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (worker_id().empty()) return;  // never registered
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::DeregisterRequest request;
  request.set_worker_id(worker_id());
  v1::DeregisterResponse response;
  (void)stub_->Deregister(&context, request, &response);
  attach_.reset();  // after the drain: the router already let the worker go
}

absl::StatusOr<std::unique_ptr<Membership>> Membership::Start(
    const std::vector<std::string>& routers, v1::RegisterRequest request,
    Registration::LoadFn load, absl::Duration timeout) {
  if (routers.empty()) return absl::InvalidArgumentError("no router to register with");
  std::unique_ptr<Membership> m(new Membership());
  for (const std::string& router : routers) {
    m->registrations_.push_back(Registration::Start(router, request, load));
  }
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    absl::Status last;
    for (const auto& r : m->registrations_) {
      const absl::Status state = r->state();
      if (state.ok()) return m;
      if (Final(state)) return state;
      last = absl::UnavailableError(
          absl::StrCat("router ", r->router_address(), " did not answer: ", state.message()));
    }
    if (absl::Now() > deadline) return last;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

std::vector<std::string> Membership::worker_ids() const {
  std::vector<std::string> ids;
  for (const auto& r : registrations_) ids.push_back(r->worker_id());
  return ids;
}

}  // namespace splitmoe::rpc
