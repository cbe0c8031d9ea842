#include "common/expert_plane/routing_table_watcher.h"

#include <algorithm>

#include "common/rpc/rpc.h"
#include "common/rpc/security.h"

namespace splitmoe::expert_plane {

std::unique_ptr<RoutingTableWatcher> RoutingTableWatcher::Start(const std::string& router_address,
                                                                std::string worker_id) {
  std::unique_ptr<RoutingTableWatcher> w(new RoutingTableWatcher());
  w->router_address_ = router_address;
  w->worker_id_ = std::move(worker_id);
  w->stub_ = v1::Registry::NewStub(rpc::InternalChannel(router_address));
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
  while (true) {
    grpc::ClientContext context;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      open_ = &context;
    }
    v1::WatchRoutingTableRequest request;
    request.set_worker_id(worker_id_);
    std::unique_ptr<grpc::ClientReader<v1::RoutingTable>> reader =
        stub_->WatchRoutingTable(&context, request);
    v1::RoutingTable table;
    while (reader->Read(&table)) {
      backoff = absl::Milliseconds(50);  // the router answers: the next loss starts afresh
      Offer(std::move(table));
      table = v1::RoutingTable();
    }
    (void)reader->Finish();  // the router went away (or we are stopping): keep the last table
    std::unique_lock<std::mutex> lock(mu_);
    open_ = nullptr;
    if (cv_.wait_for(lock, absl::ToChronoMilliseconds(backoff), [this] { return stopping_; }))
      return;
    backoff = std::min(backoff * 2, absl::Seconds(1));
  }
}

}  // namespace splitmoe::expert_plane
