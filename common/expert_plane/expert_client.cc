#include "common/expert_plane/expert_client.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"

namespace splitmoe::expert_plane {

absl::StatusOr<std::unique_ptr<ExpertClient>> ExpertClient::Connect(
    const std::string& address, absl::Duration connect_timeout, OnBreak on_break) {
  std::unique_ptr<ExpertClient> c(new ExpertClient());
  c->address_ = address;
  c->on_break_ = std::move(on_break);
  c->channel_ = rpc::InternalChannel(address);
  if (!c->channel_->WaitForConnected(std::chrono::system_clock::now() +
                                     absl::ToChronoMilliseconds(connect_timeout))) {
    return absl::UnavailableError(absl::StrCat("expert replica ", address, " unreachable"));
  }
  c->stub_ = v1::ExpertCompute::NewStub(c->channel_);
  c->stream_ = c->stub_->Compute(&c->context_);
  if (c->stream_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("expert replica ", address, ": no stream"));
  }
  c->reader_ = std::thread([raw = c.get()] { raw->ReadLoop(); });
  c->writer_ = std::thread([raw = c.get()] { raw->WriteLoop(); });
  return c;
}

ExpertClient::~ExpertClient() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
  }
  cv_.notify_all();
  context_.TryCancel();  // unblocks a write held by flow control and the reader
  if (writer_.joinable()) writer_.join();
  if (reader_.joinable()) reader_.join();
  if (stream_ != nullptr) (void)stream_->Finish();  // null when Connect failed
  Break(absl::UnavailableError(absl::StrCat("expert replica ", address_, ": client closed")));
}

bool ExpertClient::broken() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !broken_.ok();
}

void ExpertClient::Send(v1::ExpertBatch batch, Done done) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!broken_.ok() || closing_) {
    absl::Status s = broken_.ok() ? absl::UnavailableError("expert client closing") : broken_;
    lock.unlock();
    done(s);
    return;
  }
  waiting_[batch.batch_id()] = std::move(done);
  queue_.push_back(std::move(batch));
  cv_.notify_all();
}

void ExpertClient::WriteLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return closing_ || !broken_.ok() || !queue_.empty(); });
    if (closing_ || !broken_.ok()) break;
    v1::ExpertBatch batch = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    const bool ok = stream_->Write(batch);
    if (!ok) {
      Break(absl::UnavailableError(absl::StrCat("expert replica ", address_, ": stream broken")));
      lock.lock();
      break;
    }
    lock.lock();
  }
  queue_.clear();
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
  Break(absl::UnavailableError(absl::StrCat("expert replica ", address_, " went away")));
}

void ExpertClient::Break(const absl::Status& status) {
  std::map<uint64_t, Done> failed;
  absl::Status why;
  OnBreak on_break;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok()) {
      broken_ = status;
      on_break.swap(on_break_);
    }
    why = broken_;
    failed.swap(waiting_);
    queue_.clear();
  }
  cv_.notify_all();
  if (on_break) on_break(why);
  for (auto& [id, done] : failed) done(why);
}

}  // namespace splitmoe::expert_plane
