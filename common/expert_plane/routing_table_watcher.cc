#include "common/expert_plane/routing_table_watcher.h"

#include <algorithm>

#include "common/rpc/rpc.h"
#include "common/rpc/security.h"

namespace splitmoe::expert_plane {

std::unique_ptr<RoutingTableWatcher> RoutingTableWatcher::Start(const std::string& routers,
                                                                std::string worker_id) {
  std::unique_ptr<RoutingTableWatcher> w(new RoutingTableWatcher());
  w->worker_id_ = std::move(worker_id);
  for (const std::string& address : rpc::RouterAddresses(routers)) {
    w->stubs_.push_back(v1::Registry::NewStub(rpc::InternalChannel(address)));
  }
  w->thread_ = std::thread([raw = w.get()] { raw->Loop(); });
  return w;
}

RoutingTableWatcher::~RoutingTableWatcher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    if (open_ != nullptr) open_->TryCancel();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<const v1::RoutingTable> RoutingTableWatcher::Current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_;
}

bool RoutingTableWatcher::WaitForTable(absl::Duration timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, absl::ToChronoMilliseconds(timeout),
                      [this] { return table_ != nullptr; });
}

void RoutingTableWatcher::Offer(v1::RoutingTable table) {
  std::lock_guard<std::mutex> lock(mu_);
  if (table_ != nullptr && table_->router_id() == table.router_id() &&
      table_->version() >= table.version()) {
    return;  // a stale or repeated version of the same router
  }
  table_ = std::make_shared<const v1::RoutingTable>(std::move(table));
  cv_.notify_all();
}

void RoutingTableWatcher::Loop() {
  absl::Duration backoff = absl::Milliseconds(50);
  size_t next = 0;
  while (!stubs_.empty()) {
    const size_t i = next;
    grpc::ClientContext context;
    if (i > 0) {
      context.set_deadline(std::chrono::system_clock::now() +
                           absl::ToChronoMilliseconds(kRecheckFirst));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      open_ = &context;
    }
    v1::WatchRoutingTableRequest request;
    request.set_worker_id(worker_id_);
    std::unique_ptr<grpc::ClientReader<v1::RoutingTable>> reader =
        stubs_[i]->WatchRoutingTable(&context, request);
    v1::RoutingTable table;
    while (reader->Read(&table)) {
      backoff = absl::Milliseconds(50);  // a router answers: the next loss starts afresh
      Offer(std::move(table));
      table = v1::RoutingTable();
    }
    // The router went away, or its time as a stand-in is up (or we are stopping): the last
    // table stays in force.
    const grpc::Status status = reader->Finish();
    std::unique_lock<std::mutex> lock(mu_);
    open_ = nullptr;
    if (stopping_) return;
    if (i > 0 && status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      next = 0;  // the first router may be back
      continue;
    }
    // The next router at once; after the whole list failed, wait (with back-off).
    next = (i + 1) % stubs_.size();
    if (next != 0) continue;
    if (cv_.wait_for(lock, absl::ToChronoMilliseconds(backoff), [this] { return stopping_; }))
      return;
    backoff = std::min(backoff * 2, absl::Seconds(1));
  }
}

}  // namespace splitmoe::expert_plane
