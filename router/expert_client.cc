#include "router/expert_client.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc.h"

namespace splitmoe::router {

absl::StatusOr<std::unique_ptr<ExpertClient>> ExpertClient::Connect(const std::string& address) {
  std::unique_ptr<ExpertClient> c(new ExpertClient());
  c->address_ = address;
  c->channel_ = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(),
                                          rpc::ClientChannelArguments());
  if (!c->channel_->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(5))) {
    return absl::UnavailableError(absl::StrCat("expert service ", address, " unreachable"));
  }
  c->stub_ = v1::ExpertCompute::NewStub(c->channel_);
  c->stream_ = c->stub_->Compute(&c->context_);
  c->reader_ = std::thread([raw = c.get()] { raw->ReadLoop(); });
  return c;
}

ExpertClient::~ExpertClient() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok()) stream_->WritesDone();
  }
  context_.TryCancel();
  if (reader_.joinable()) reader_.join();
  (void)stream_->Finish();
  FailAll(absl::UnavailableError(absl::StrCat("expert service ", address_, ": client closed")));
}

bool ExpertClient::broken() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !broken_.ok();
}

void ExpertClient::Send(v1::ExpertBatch batch, Done done) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!broken_.ok()) {
    absl::Status s = broken_;
    lock.unlock();
    done(s);
    return;
  }
  const uint64_t id = batch.batch_id();
  waiting_[id] = std::move(done);
  if (!stream_->Write(batch)) {
    broken_ = absl::UnavailableError(absl::StrCat("expert service ", address_, ": stream broken"));
    absl::Status status = broken_;
    lock.unlock();
    FailAll(status);
  }
}

void ExpertClient::ReadLoop() {
  v1::ExpertResult result;
  while (stream_->Read(&result)) {
    Done done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = waiting_.find(result.batch_id());
      if (it == waiting_.end()) continue;
      done = std::move(it->second);
      waiting_.erase(it);
    }
    done(std::move(result));
    result = v1::ExpertResult();
  }
  absl::Status status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok())
      broken_ = absl::UnavailableError(absl::StrCat("expert service ", address_, " went away"));
    status = broken_;
  }
  FailAll(status);
}

void ExpertClient::FailAll(const absl::Status& status) {
  std::map<uint64_t, Done> failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed.swap(waiting_);
  }
  for (auto& [id, done] : failed) done(status);
}

}  // namespace splitmoe::router
