#include "common/rpc/registration.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc.h"

namespace splitmoe::rpc {

absl::StatusOr<std::unique_ptr<Registration>> Registration::Start(const std::string& router_address,
                                                                  v1::RegisterRequest request,
                                                                  LoadFn load,
                                                                  absl::Duration timeout) {
  std::unique_ptr<Registration> r(new Registration());
  r->request_ = std::move(request);
  r->load_ = std::move(load);
  r->stub_ = v1::Registry::NewStub(grpc::CreateCustomChannel(
      router_address, grpc::InsecureChannelCredentials(), ClientChannelArguments()));
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
      (void)RegisterOnce();
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
}

}  // namespace splitmoe::rpc
