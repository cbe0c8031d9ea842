#include "common/expert_plane/ucx_expert.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace splitmoe::expert_plane {

// One replica: batches over the link's transport to the replica's UCX worker, and the idle gRPC
// stream whose break marks the channel broken.
class UcxExpertLink::Channel final : public ExpertChannel {
 public:
  Channel(UcxExpertLink* link, uint64_t id, transfer::PeerId peer, std::string address)
      : link_(link), id_(id), peer_(peer), address_(std::move(address)) {}
  ~Channel() override {
    liveness_.reset();  // its break callback may still name this channel: before Close
    link_->Close(id_);
  }

  void Send(v1::ExpertBatch batch, Done done) override {
    const uint64_t batch_id = batch.batch_id();
    if (!link_->Expect(id_, batch_id, done)) return;
    link_->transport_->SendMessage(
        peer_, kExpertBatchTag, batch.SerializeAsString(),
        [link = link_, batch_id, address = address_](absl::Status s) {
          if (s.ok()) return;
          link->FailBatch(batch_id,
                          absl::UnavailableError(absl::StrCat(
                              "expert replica ", address, " (ucx): ", s.message())));
        });
  }
  const std::string& address() const override { return address_; }
  bool broken() const override { return !link_->Broken(id_).ok(); }
  absl::string_view transport() const override { return "ucx"; }

 private:
  friend class UcxExpertLink;
  UcxExpertLink* link_;
  uint64_t id_;
  transfer::PeerId peer_;
  std::string address_;
  std::unique_ptr<ExpertClient> liveness_;
};

absl::StatusOr<std::unique_ptr<transfer::UcxTransport>> StartExpertTransport(
    absl::string_view name, absl::Duration busy_poll, transfer::MessageHandler handler) {
  transfer::TransportOptions options;
  options.name = std::string(name);
  options.busy_poll_us = absl::ToInt64Microseconds(busy_poll);
  absl::StatusOr<std::unique_ptr<transfer::UcxTransport>> transport =
      transfer::UcxTransport::Create(options);
  if (!transport.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the UCX expert transport cannot start: ", transport.status().message()));
  }
  (*transport)->SetMessageHandler(std::move(handler));
  return transport;
}

absl::StatusOr<std::unique_ptr<UcxExpertLink>> UcxExpertLink::Create(absl::string_view name,
                                                                     absl::Duration busy_poll) {
  std::unique_ptr<UcxExpertLink> link(new UcxExpertLink());
  absl::StatusOr<std::unique_ptr<transfer::UcxTransport>> transport = StartExpertTransport(
      name, busy_poll, [raw = link.get()](transfer::Message m) { raw->OnMessage(std::move(m)); });
  if (!transport.ok()) return transport.status();
  link->transport_ = std::move(*transport);
  return link;
}

UcxExpertLink::~UcxExpertLink() {
  // The progress thread stops first: no answer can arrive while the rest fail. (No transport:
  // Create failed before it started.)
  if (transport_ != nullptr) transport_->Shutdown();
  std::map<uint64_t, Waiting> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(waiting_);
  }
  for (auto& [id, w] : left) w.done(absl::UnavailableError("UCX expert link closed"));
}

absl::StatusOr<std::unique_ptr<ExpertChannel>> UcxExpertLink::Connect(
    const v1::ExpertReplica& replica, absl::Duration connect_timeout) {
  if (replica.ucx_worker_address().empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("expert replica ", replica.address(), " has no UCX address"));
  }
  absl::StatusOr<transfer::PeerId> peer = transport_->Connect(replica.ucx_worker_address());
  if (!peer.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expert replica ", replica.address(), ": no UCX path to it: ", peer.status().message()));
  }
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    id = next_channel_++;
  }
  auto channel = std::make_unique<Channel>(this, id, *peer, replica.address());
  absl::StatusOr<std::unique_ptr<ExpertClient>> liveness = ExpertClient::Connect(
      replica.address(), connect_timeout,
      [this, id](const absl::Status& why) { Fail(id, why); });
  if (!liveness.ok()) return liveness.status();
  channel->liveness_ = std::move(*liveness);
  return channel;
}

void UcxExpertLink::OnMessage(transfer::Message m) {
  if (m.tag != kExpertResultTag) return;
  v1::ExpertResult result;
  if (!result.ParseFromString(m.payload)) return;  // not ours: its batch fails by deadline
  ExpertChannel::Done done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = waiting_.find(result.batch_id());
    if (it == waiting_.end()) return;  // failed already (a late answer)
    done = std::move(it->second.done);
    waiting_.erase(it);
  }
  done(std::move(result));
}

bool UcxExpertLink::Expect(uint64_t channel, uint64_t batch_id, ExpertChannel::Done& done) {
  absl::Status broken;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = broken_.find(channel);
    if (it == broken_.end()) {
      waiting_[batch_id] = Waiting{channel, std::move(done)};
      return true;
    }
    broken = it->second;
  }
  done(broken);
  return false;
}

void UcxExpertLink::Fail(uint64_t channel, const absl::Status& status) {
  std::vector<ExpertChannel::Done> failed;
  absl::Status why;
  {
    std::lock_guard<std::mutex> lock(mu_);
    why = broken_.emplace(channel, status).first->second;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      if (it->second.channel == channel) {
        failed.push_back(std::move(it->second.done));
        it = waiting_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& done : failed) done(why);
}

void UcxExpertLink::FailBatch(uint64_t batch_id, const absl::Status& status) {
  ExpertChannel::Done done;
  uint64_t channel = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = waiting_.find(batch_id);
    if (it == waiting_.end()) return;
    done = std::move(it->second.done);
    channel = it->second.channel;
    waiting_.erase(it);
  }
  done(status);
  // A send that failed failed the UCX peer: everything else on it fails too.
  Fail(channel, status);
}

absl::Status UcxExpertLink::Broken(uint64_t channel) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = broken_.find(channel);
  return it == broken_.end() ? absl::OkStatus() : it->second;
}

void UcxExpertLink::Close(uint64_t channel) {
  Fail(channel, absl::UnavailableError("expert channel closed"));
  std::lock_guard<std::mutex> lock(mu_);
  broken_.erase(channel);
}

}  // namespace splitmoe::expert_plane
