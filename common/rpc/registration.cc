#include "common/rpc/registration.h"

#include <iostream>

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

absl::StatusOr<std::unique_ptr<Registration>> Registration::Start(const std::string& router_address,
                                                                  v1::RegisterRequest request,
                                                                  LoadFn load,
                                                                  absl::Duration timeout) {
  std::unique_ptr<Registration> r(new Registration());
  r->request_ = std::move(request);
  r->load_ = std::move(load);
  r->stub_ = v1::Registry::NewStub(InternalChannel(router_address));
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status status;
  while (!(status = r->RegisterOnce()).ok()) {
    // A refusal (wrong model, bad request) is final; an unreachable router may come up later.
    if (status.code() != absl::StatusCode::kUnavailable &&
        status.code() != absl::StatusCode::kDeadlineExceeded) {
      return status;
    }
    if (absl::Now() > deadline) {
      return absl::UnavailableError(
          absl::StrCat("router ", router_address, " did not answer: ", status.message()));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  r->Reattach();
  r->thread_ = std::thread([raw = r.get()] { raw->HeartbeatLoop(); });
  return r;
}

absl::Status Registration::RegisterOnce() {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::RegisterResponse response;
  absl::Status status = FromGrpcStatus(stub_->Register(&context, request_, &response));
  if (!status.ok()) return status;
  std::lock_guard<std::mutex> lock(mu_);
  worker_id_ = response.worker_id();
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

void Registration::HeartbeatLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
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
      std::cerr << "router forgot worker " << beat.worker_id() << ": registering again\n";
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
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::DeregisterRequest request;
  request.set_worker_id(worker_id());
  v1::DeregisterResponse response;
  (void)stub_->Deregister(&context, request, &response);
  attach_.reset();  // after the drain: the router already let the worker go
}

}  // namespace splitmoe::rpc
