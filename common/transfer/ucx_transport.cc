#include "common/transfer/ucx_transport.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace splitmoe::transfer {
namespace {

using Clock = std::chrono::steady_clock;

// Active-message ids. Headers are plain little-endian structs copied with memcpy.
constexpr unsigned kAmPut = 11;           // PutHeader + data landed at remote_addr
constexpr unsigned kAmFlushRequest = 12;  // FlushRequestHeader, sent with a reply endpoint
constexpr unsigned kAmFlushReply = 13;    // FlushReplyHeader
constexpr unsigned kAmNotify = 14;        // NotifyHeader + payload
constexpr unsigned kAmMessage = 15;       // MessageHeader + payload, sent with a reply endpoint
constexpr unsigned kAmHello = 16;         // HelloHeader + the sender's worker address
constexpr unsigned kAmGetRequest = 17;    // GetRequestHeader, sent with a reply endpoint
constexpr unsigned kAmGetReply = 18;      // GetReplyHeader + the bytes read

struct PutHeader {
  uint64_t source_id;
  uint64_t seq;  // 1-based count of active-message puts on this endpoint
  uint64_t remote_addr;
};
struct FlushRequestHeader {
  uint64_t source_id;
  uint64_t flush_seq;
  uint64_t puts_sent;  // reply once puts 1..puts_sent from source_id have landed
};
struct FlushReplyHeader {
  uint64_t flush_seq;
  uint64_t rejected_puts;  // cumulative, from this source
};
struct GetRequestHeader {
  uint64_t source_id;
  uint64_t get_seq;
  uint64_t remote_addr;
  uint64_t bytes;
};
struct GetReplyHeader {
  uint64_t get_seq;
  uint64_t refused;  // 1: the range lies outside the target's registered regions
};
struct NotifyHeader {
  uint64_t source_id;
  uint64_t puts_sent;  // deliver once puts 1..puts_sent have landed
  uint32_t tag;
  uint32_t reserved;
};

struct MessageHeader {
  uint64_t source_id;
  uint32_t tag;
  uint32_t reserved;
};

// The first message on every endpoint we create: who we are and where to answer us. Replies
// (SendReply, flush replies) then go over an endpoint the receiver creates and owns. UCX's own
// reply endpoint is not safe to keep: when the sender dies UCX destroys it, and a reply sent on
// it later touched freed memory (an expert replica answering a killed decode worker crashed).
struct HelloHeader {
  uint64_t source_id;
};
constexpr size_t kMaxWorkerAddressBytes = 16384;

template <typename T>
std::string HeaderBytes(const T& h) {
  return std::string(reinterpret_cast<const char*>(&h), sizeof(T));
}

template <typename T>
bool ParseHeader(const void* header, size_t length, T& out) {
  if (length != sizeof(T) || header == nullptr) return false;
  std::memcpy(&out, header, sizeof(T));
  return true;
}

absl::Status FromUcs(ucs_status_t status, absl::string_view what) {
  if (status == UCS_OK) return absl::OkStatus();
  std::string message = absl::StrCat(what, ": ", ucs_status_string(status));
  switch (status) {
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return absl::InvalidArgumentError(message);
    case UCS_ERR_CANCELED:
      return absl::CancelledError(message);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
      return absl::ResourceExhaustedError(message);
    case UCS_ERR_TIMED_OUT:
      return absl::DeadlineExceededError(message);
    case UCS_ERR_UNSUPPORTED:
      return absl::UnimplementedError(message);
    default:
      return absl::UnavailableError(message);
  }
}

// Picks the put path from ucp_ep_print_info's lane table: RMA when some lane that carries RMA
// ("rma#n" / "rma_bw#n") is not tcp. Lines look like
//   "#  lane[2]:  2:cma/memory.0 md[2]  -> md[2]/cma/sysdev[255] rma_bw#0".
PutPath ResolvePutPath(absl::string_view lanes) {
  for (absl::string_view line : absl::StrSplit(lanes, '\n')) {
    if (line.find("lane[") == absl::string_view::npos) continue;
    size_t arrow = line.find("->");
    if (arrow == absl::string_view::npos) continue;
    bool rma = false;
    for (absl::string_view token : absl::StrSplit(line.substr(arrow), ' ', absl::SkipEmpty())) {
      if (token.substr(0, 3) == "rma") rma = true;
    }
    if (!rma) continue;
    size_t colon = line.find(':', line.find("lane["));
    colon = line.find(':', colon + 1);  // "lane[i]:" then "N:tl/dev"
    if (colon == absl::string_view::npos) continue;
    absl::string_view tl = line.substr(colon + 1);
    tl = tl.substr(0, tl.find('/'));
    if (tl != "tcp") return PutPath::kRma;
  }
  return PutPath::kActiveMessage;
}

std::string EndpointLanes(ucp_ep_h ep) {
  char* buf = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&buf, &size);
  if (stream == nullptr) return "";
  ucp_ep_print_info(ep, stream);
  std::fclose(stream);
  std::string out(buf, size);
  std::free(buf);
  return out;
}

}  // namespace

absl::string_view PutPathName(PutPath path) {
  switch (path) {
    case PutPath::kAuto:
      return "auto";
    case PutPath::kRma:
      return "rma";
    case PutPath::kActiveMessage:
      return "am";
  }
  return "?";
}

std::string TransportCapabilities::Summary() const {
  return absl::StrCat("put=", PutPathName(configured_put_path), " (rma peers ", rma_peers,
                      ", am peers ", active_message_peers, ")");
}

class UcxTransport::Impl {
 public:
  explicit Impl(const TransportOptions& options) : options_(options) {
    std::random_device rd;
    source_id_ = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(getpid());
  }

  ~Impl() { Shutdown(); }

  absl::Status Start() {
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) return absl::InternalError(Prefix("eventfd failed"));
    std::promise<absl::Status> started;
    std::future<absl::Status> result = started.get_future();
    thread_ = std::thread([this, p = std::move(started)]() mutable { ThreadMain(std::move(p)); });
    absl::Status status = result.get();
    if (!status.ok()) {
      thread_.join();
      ::close(event_fd_);
      event_fd_ = -1;
    }
    return status;
  }

  void Shutdown() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (shutdown_started_ || !thread_.joinable()) return;
      if (std::this_thread::get_id() == thread_.get_id()) {
        std::fprintf(stderr, "%s: Shutdown on the progress thread would deadlock\n",
                     options_.name.c_str());
        std::abort();
      }
      shutdown_started_ = true;
      accepting_ = false;
      stop_requested_.store(true, std::memory_order_release);
      has_tasks_.store(true, std::memory_order_release);
      Wake();
    }
    thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    ::close(event_fd_);
    event_fd_ = -1;
  }

  const std::string& worker_address() const { return worker_address_; }
  bool cuda_memory() const { return cuda_memory_; }
  uint64_t source_id() const { return source_id_; }

  // ---- Synchronous calls, run on the progress thread ----

  absl::StatusOr<Region> RegisterRegion(size_t size_bytes) {
    if (size_bytes == 0) return absl::InvalidArgumentError(Prefix("RegisterRegion: size 0"));
    return Call<Region>([this, size_bytes] { return DoRegisterRegion(size_bytes); });
  }

  absl::Status ReleaseRegion(uint64_t region_id) {
    absl::StatusOr<bool> r = Call<bool>([this, region_id]() -> absl::StatusOr<bool> {
      auto it = region_base_by_id_.find(region_id);
      if (it == region_base_by_id_.end()) {
        return absl::NotFoundError(Prefix(absl::StrCat("no region ", region_id)));
      }
      auto rit = regions_.find(it->second);
      ucp_mem_unmap(context_, rit->second.memh);
      regions_.erase(rit);
      region_base_by_id_.erase(it);
      return true;
    });
    return r.status();
  }

  absl::StatusOr<PeerId> Connect(absl::string_view address) {
    if (address.empty()) return absl::InvalidArgumentError(Prefix("Connect: empty address"));
    return Call<PeerId>([this, a = std::string(address)] { return DoConnect(a); });
  }

  absl::StatusOr<PeerInfo> GetPeerInfo(PeerId id) {
    return Call<PeerInfo>([this, id]() -> absl::StatusOr<PeerInfo> {
      auto it = peers_.find(id);
      if (it == peers_.end()) return absl::NotFoundError(Prefix(absl::StrCat("no peer ", id)));
      return PeerInfo{it->second->path, it->second->lanes};
    });
  }

  // ---- Asynchronous operations ----

  void Put(PeerId peer, const void* local, size_t bytes, const RegionDescriptor& remote,
           uint64_t offset, DoneCallback done) {
    PostRma("Put", peer, local, bytes, remote, offset, std::move(done), &Impl::DoPut);
  }

  void Get(PeerId peer, void* local, size_t bytes, const RegionDescriptor& remote,
           uint64_t offset, DoneCallback done) {
    PostRma("Get", peer, local, bytes, remote, offset, std::move(done), &Impl::DoGet);
  }

  // Put and Get: the range checked against the descriptor (refused inline), then `run` on the
  // progress thread.
  template <typename Local, typename Run>
  void PostRma(const char* what, PeerId peer, Local* local, size_t bytes,
               const RegionDescriptor& remote, uint64_t offset, DoneCallback done, Run run) {
    if (offset > remote.size_bytes || bytes > remote.size_bytes - offset) {
      done(absl::InvalidArgumentError(
          Prefix(absl::StrCat(what, ": ", bytes, " bytes at offset ", offset,
                              " are outside the remote region of ", remote.size_bytes, " bytes"))));
      return;
    }
    if (bytes == 0) {
      done(absl::OkStatus());
      return;
    }
    if (local == nullptr) {
      done(absl::InvalidArgumentError(Prefix(absl::StrCat(what, ": null local buffer"))));
      return;
    }
    auto shared_done = std::make_shared<DoneCallback>(std::move(done));
    bool posted = Post([this, peer, local, bytes, addr = remote.remote_addr + offset,
                        rkey = remote.rkey, owner = remote.worker_address, shared_done,
                        run]() mutable {
      (this->*run)(peer, local, bytes, addr, rkey, owner, std::move(*shared_done));
    });
    if (!posted) (*shared_done)(ShutDownError());
  }

  void Flush(PeerId peer, DoneCallback done) {
    auto shared_done = std::make_shared<DoneCallback>(std::move(done));
    if (!Post([this, peer, shared_done] { DoFlush(peer, std::move(*shared_done)); })) {
      (*shared_done)(ShutDownError());
    }
  }

  void SendNotification(PeerId peer, uint32_t tag, absl::string_view payload, DoneCallback done) {
    if (payload.size() > kMaxNotificationBytes) {
      done(absl::InvalidArgumentError(Prefix(absl::StrCat(
          "notification payload of ", payload.size(), " bytes exceeds ", kMaxNotificationBytes))));
      return;
    }
    auto shared_done = std::make_shared<DoneCallback>(std::move(done));
    if (!Post([this, peer, tag, p = std::string(payload), shared_done]() mutable {
          DoNotify(peer, tag, std::move(p), std::move(*shared_done));
        })) {
      (*shared_done)(ShutDownError());
    }
  }

  void SendMessage(PeerId peer, uint32_t tag, std::string payload, DoneCallback done) {
    auto shared_done = std::make_shared<DoneCallback>(std::move(done));
    if (!Post([this, peer, tag, p = std::move(payload), shared_done]() mutable {
          Peer* target = UsablePeer(peer, *shared_done);
          if (target == nullptr) return;
          DoSendMessage(target->ep, peer, tag, std::move(p), std::move(*shared_done));
        })) {
      (*shared_done)(ShutDownError());
    }
  }

  void SendReply(const ReplyTo& to, uint32_t tag, std::string payload, DoneCallback done) {
    if (to.endpoint == 0) {
      done(absl::InvalidArgumentError(Prefix("SendReply: no reply endpoint")));
      return;
    }
    auto shared_done = std::make_shared<DoneCallback>(std::move(done));
    if (!Post([this, to, tag, p = std::move(payload), shared_done]() mutable {
          if (closing_) return (*shared_done)(absl::CancelledError(Prefix("transport shut down")));
          PeerId peer = 0;
          ucp_ep_h ep = ReplyEndpoint(to.source_id, reinterpret_cast<ucp_ep_h>(to.endpoint), &peer);
          if (ep == nullptr) {
            return (*shared_done)(absl::UnavailableError(
                Prefix(absl::StrCat("SendReply: source ", to.source_id, " is gone"))));
          }
          DoSendMessage(ep, peer, tag, std::move(p), std::move(*shared_done));
        })) {
      (*shared_done)(ShutDownError());
    }
  }

  void SetMessageHandler(MessageHandler handler) {
    Install(std::move(handler), &message_handler_, &undelivered_messages_);
  }

  void SetNotificationHandler(NotificationHandler handler) {
    Install(std::move(handler), &handler_, &undelivered_);
  }

  // Sets `*slot` to `handler` on the progress thread and hands it what arrived before it.
  template <typename Handler, typename Item>
  void Install(Handler handler, Handler* slot, std::deque<Item>* queued) {
    auto shared = std::make_shared<Handler>(std::move(handler));
    Post([shared, slot, queued] {
      *slot = std::move(*shared);
      while (*slot && !queued->empty()) {
        Item item = std::move(queued->front());
        queued->pop_front();
        (*slot)(std::move(item));
      }
    });
  }

  TransportCapabilities Capabilities() const {
    TransportCapabilities caps;
    caps.configured_put_path = options_.put_path;
    caps.rma_peers = rma_peers_.load();
    caps.active_message_peers = am_peers_.load();
    return caps;
  }

  TransportStats Stats() const {
    TransportStats s;
    s.bytes_put = bytes_put_.load();
    s.bytes_received = bytes_received_.load();
    s.puts_completed = puts_completed_.load();
    s.puts_failed = puts_failed_.load();
    s.puts_rejected = puts_rejected_.load();
    s.notifications_sent = notifications_sent_.load();
    s.notifications_received = notifications_received_.load();
    s.messages_sent = messages_sent_.load();
    s.messages_received = messages_received_.load();
    s.message_bytes_sent = message_bytes_sent_.load();
    s.message_bytes_received = message_bytes_received_.load();
    s.messages_rejected = messages_rejected_.load();
    return s;
  }

 private:
  // One in-flight UCX request or one Flush awaiting its acknowledgement.
  enum class OpKind {
    kPut, kFlush, kEpFlush, kNotify, kInternalSend, kRecv, kClose, kMessage, kRecvMessage,
    kGet,      // an RMA get, or an active-message get waiting for its reply (get_seq != 0)
    kGetRecv,  // a get reply's rendezvous data being received into the get's buffer
  };
  struct Op {
    Impl* impl = nullptr;
    OpKind kind = OpKind::kPut;
    PeerId peer = 0;  // 0: none (target-side work)
    DoneCallback done;
    Clock::time_point deadline;
    uint64_t bytes = 0;
    uint64_t flush_seq = 0;         // kFlush / kEpFlush / flush-request kInternalSend
    uint64_t source_id = 0;         // kRecv
    uint64_t seq = 0;               // kRecv
    std::string header;             // AM header; must outlive the request
    std::string payload;            // notification or message payload; must outlive the request
    Message message;                // kRecvMessage: what is being received
    std::vector<ucp_rkey_h> rkeys;  // kClose: destroyed when the close completes
    void* local = nullptr;          // kGet / kGetRecv: where the bytes go
    uint64_t get_seq = 0;           // kGet (active messages) / kGetRecv
    void* request = nullptr;
    bool orphaned = false;  // reported already; freed when UCX lets go of it
  };

  struct Peer {
    PeerId id = 0;
    std::string address;
    ucp_ep_h ep = nullptr;
    PutPath path = PutPath::kAuto;
    std::string lanes;
    absl::Status failure;  // not OK: every operation fails with it
    uint64_t am_puts_sent = 0;
    uint64_t rejected_seen = 0;
    std::unordered_map<std::string, ucp_rkey_h> rkeys;  // by packed rkey bytes
  };

  // What this process knows about an initiator writing into it with active messages.
  struct Source {
    uint64_t watermark = 0;     // every put with seq <= watermark has landed
    std::set<uint64_t> landed;  // seqs above the watermark that have landed
    uint64_t rejected = 0;
    std::vector<std::pair<uint64_t, std::function<void()>>> waiters;  // (seq needed, action)
    std::string address;  // the sender's worker address (its hello); empty until it came
  };

  struct RegionRecord {
    uint64_t id;
    ucp_mem_h memh;
    size_t size_bytes;
  };

  std::string Prefix(absl::string_view message) const {
    return absl::StrCat(options_.name, ": ", message);
  }
  absl::Status ShutDownError() const {
    return absl::FailedPreconditionError(Prefix("transport is shut down"));
  }
  Clock::time_point Deadline() const {
    return Clock::now() + std::chrono::milliseconds(options_.operation_timeout_ms);
  }

  // ---- Mailbox ----

  bool Post(absl::AnyInvocable<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!accepting_) return false;
      tasks_.push_back(std::move(task));
      has_tasks_.store(true);
      // A polling progress thread sees has_tasks_; one that sleeps (or is about to: it sets
      // sleeping_ before its last look at has_tasks_) needs the event. Under the lock:
      // Shutdown closes the fd under it.
      if (sleeping_.load()) Wake();
    }
    return true;
  }

  void Wake() {
    uint64_t one = 1;
    ssize_t ignored = ::write(event_fd_, &one, sizeof(one));
    (void)ignored;
  }

  bool RunTasks() {
    if (!has_tasks_.load(std::memory_order_acquire)) return false;
    std::deque<absl::AnyInvocable<void()>> tasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks.swap(tasks_);
      has_tasks_.store(false, std::memory_order_release);
    }
    for (auto& task : tasks) task();
    return true;
  }

  // Runs fn on the progress thread and waits for its result.
  template <typename T, typename F>
  absl::StatusOr<T> Call(F fn) {
    if (std::this_thread::get_id() == thread_id_) {
      return absl::FailedPreconditionError(
          Prefix("synchronous transport call from a transport callback"));
    }
    auto promise = std::make_shared<std::promise<absl::StatusOr<T>>>();
    std::future<absl::StatusOr<T>> future = promise->get_future();
    if (!Post([promise, fn = std::move(fn)]() mutable { promise->set_value(fn()); })) {
      return ShutDownError();
    }
    // The deadline covers a wedged progress thread; the task itself never blocks.
    if (future.wait_for(std::chrono::milliseconds(options_.operation_timeout_ms)) !=
        std::future_status::ready) {
      return absl::DeadlineExceededError(Prefix("progress thread did not answer in time"));
    }
    return future.get();
  }

  // ---- Progress thread ----

  void ThreadMain(std::promise<absl::Status> started) {
    thread_id_ = std::this_thread::get_id();
    absl::Status status = InitUcx();
    if (!status.ok()) {
      TeardownUcx();
      std::lock_guard<std::mutex> lock(mu_);
      accepting_ = false;
      started.set_value(status);
      return;
    }
    started.set_value(absl::OkStatus());
    Loop();
    Teardown();
  }

  absl::Status InitUcx() {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return FromUcs(s, Prefix("ucp_config_read"));
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 0;
    s = ucp_init(&params, config, &context_);
    if (s != UCS_OK) {
      // Some transports cannot wake a sleeping worker; fall back to timed polling.
      params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM;
      s = ucp_init(&params, config, &context_);
    }
    ucp_config_release(config);
    if (s != UCS_OK) {
      context_ = nullptr;
      return FromUcs(s, Prefix("ucp_init"));
    }
    ucp_context_attr_t attr{};
    attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    cuda_memory_ = ucp_context_query(context_, &attr) == UCS_OK &&
                   (attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;

    ucp_worker_params_t wparams{};
    wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wparams.thread_mode = UCS_THREAD_MODE_SINGLE;
    s = ucp_worker_create(context_, &wparams, &worker_);
    if (s != UCS_OK) {
      worker_ = nullptr;
      return FromUcs(s, Prefix("ucp_worker_create"));
    }

    ucp_address_t* address = nullptr;
    size_t address_length = 0;
    s = ucp_worker_get_address(worker_, &address, &address_length);
    if (s != UCS_OK) return FromUcs(s, Prefix("ucp_worker_get_address"));
    worker_address_.assign(reinterpret_cast<const char*>(address), address_length);
    ucp_worker_release_address(worker_, address);

    if (ucp_worker_get_efd(worker_, &worker_fd_) != UCS_OK) worker_fd_ = -1;
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) return absl::InternalError(Prefix("epoll_create1 failed"));
    for (int fd : {event_fd_, worker_fd_}) {
      if (fd < 0) continue;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
        return absl::InternalError(Prefix("epoll_ctl failed"));
      }
    }

    struct Handler {
      unsigned id;
      ucp_am_recv_callback_t cb;
    };
    for (const Handler& h :
         {Handler{kAmPut, &Impl::OnPutAm}, Handler{kAmFlushRequest, &Impl::OnFlushRequestAm},
          Handler{kAmFlushReply, &Impl::OnFlushReplyAm}, Handler{kAmNotify, &Impl::OnNotifyAm},
          Handler{kAmMessage, &Impl::OnMessageAm}, Handler{kAmHello, &Impl::OnHelloAm},
          Handler{kAmGetRequest, &Impl::OnGetRequestAm},
          Handler{kAmGetReply, &Impl::OnGetReplyAm}}) {
      ucp_am_handler_param_t hp{};
      hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                      UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
      hp.id = h.id;
      hp.cb = h.cb;
      hp.arg = this;
      hp.flags = UCP_AM_FLAG_WHOLE_MSG;
      s = ucp_worker_set_am_recv_handler(worker_, &hp);
      if (s != UCS_OK) return FromUcs(s, Prefix("ucp_worker_set_am_recv_handler"));
    }
    return absl::OkStatus();
  }

  void Loop() {
    auto next_deadline_check = Clock::now();
    auto last_active = Clock::now();
    const auto busy_poll = std::chrono::microseconds(options_.busy_poll_us);
    std::optional<Clock::time_point> drain_deadline;
    while (true) {
      bool active = RunTasks();
      while (ucp_worker_progress(worker_) != 0) active = true;
      active |= RunPendingActions();
      const auto now = Clock::now();
      if (active) last_active = now;
      if (now >= next_deadline_check) {
        CheckDeadlines(now);
        next_deadline_check = now + std::chrono::milliseconds(5);
      }
      const bool busy =
          live_ops_ > 0 || !pending_actions_.empty() || has_tasks_.load(std::memory_order_acquire);
      if (stop_requested_.load(std::memory_order_acquire)) {
        if (!drain_deadline) {
          drain_deadline = now + std::chrono::milliseconds(options_.shutdown_timeout_ms);
        }
        if (!busy || now >= *drain_deadline) return;
      }
      if (busy) {  // poll while operations are in flight
        if (!active) std::this_thread::yield();  // a thread with work on this core goes first
        continue;
      }
      // Poll a while after the last activity too: the next message of a conversation (the
      // answer to a request, the next MoE layer) comes sooner than a sleeping thread wakes.
      if (now - last_active < busy_poll) {
        std::this_thread::yield();  // a thread with work on this core goes first
        continue;
      }
      sleeping_.store(true);
      if (has_tasks_.load()) {  // posted before sleeping_ was seen: no wake-up is coming
        sleeping_.store(false);
        continue;
      }
      if (worker_fd_ >= 0) {
        ucs_status_t s = ucp_worker_arm(worker_);
        if (s == UCS_ERR_BUSY) {  // events arrived meanwhile: progress them, not asleep
          sleeping_.store(false);
          continue;
        }
      }
      epoll_event events[4];
      epoll_wait(epoll_fd_, events, 4, worker_fd_ >= 0 ? 50 : 1);
      sleeping_.store(false);
      uint64_t counter;
      ssize_t ignored = ::read(event_fd_, &counter, sizeof(counter));
      (void)ignored;
    }
  }

  bool RunPendingActions() {
    bool ran = false;
    while (!pending_actions_.empty()) {
      std::vector<std::function<void()>> actions;
      actions.swap(pending_actions_);
      for (auto& action : actions) action();
      ran = true;
    }
    return ran;
  }

  void CheckDeadlines(Clock::time_point now) {
    std::set<PeerId> expired;
    std::vector<Op*> stale;  // target-side work for an initiator that went quiet
    for (auto& [ptr, op] : ops_) {
      if (op->orphaned || now < op->deadline) continue;
      if (op->peer == 0 || op->kind == OpKind::kClose) {
        stale.push_back(ptr);
      } else {
        expired.insert(op->peer);
      }
    }
    for (Op* op : stale) {
      // A reply that never left, or a message never received whole: its sender or receiver hears
      // of it (the reply's `done`; the message is dropped and counted).
      if (op->kind == OpKind::kRecvMessage) ++messages_rejected_;
      OrphanOp(op, op->kind == OpKind::kMessage
                       ? absl::DeadlineExceededError(Prefix(absl::StrCat(
                             "reply not sent within ", options_.operation_timeout_ms, " ms")))
                       : absl::OkStatus());
    }
    for (PeerId id : expired) {
      FailPeer(id, absl::DeadlineExceededError(
                       Prefix(absl::StrCat("peer ", id, " did not complete an operation within ",
                                           options_.operation_timeout_ms, " ms"))));
    }
  }

  // ---- Operations bookkeeping (progress thread) ----

  Op* NewOp(OpKind kind, PeerId peer, DoneCallback done) {
    auto op = std::make_unique<Op>();
    op->impl = this;
    op->kind = kind;
    op->peer = peer;
    op->done = std::move(done);
    op->deadline = Deadline();
    Op* raw = op.get();
    ops_.emplace(raw, std::move(op));
    ++live_ops_;
    return raw;
  }

  // Reports `status` once (if not yet reported) and frees the op.
  void FinishOp(Op* op, absl::Status status) {
    DoneCallback done = std::move(op->done);
    op->done = nullptr;
    if (!op->orphaned) --live_ops_;
    ops_.erase(op);
    if (done) done(std::move(status));
  }

  // Reports `status` now but keeps the op until UCX completes its request.
  void OrphanOp(Op* op, const absl::Status& status) {
    if (op->orphaned) return;
    op->orphaned = true;
    --live_ops_;
    if (op->done) {
      DoneCallback done = std::move(op->done);
      op->done = nullptr;
      done(status);
    }
  }

  ucp_request_param_t SendParam(Op* op) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &Impl::OnSendComplete;
    p.user_data = op;
    return p;
  }

  void HandleNbx(Op* op, ucs_status_ptr_t r) {
    if (r == nullptr) {
      OnComplete(op, UCS_OK);
    } else if (UCS_PTR_IS_ERR(r)) {
      OnComplete(op, UCS_PTR_STATUS(r));
    } else {
      op->request = r;
    }
  }

  static void OnSendComplete(void* request, ucs_status_t status, void* user_data) {
    auto* op = static_cast<Op*>(user_data);
    ucp_request_free(request);
    op->request = nullptr;
    op->impl->OnComplete(op, status);
  }

  static void OnRecvComplete(void* request, ucs_status_t status, size_t /*length*/,
                             void* user_data) {
    auto* op = static_cast<Op*>(user_data);
    ucp_request_free(request);
    op->request = nullptr;
    op->impl->OnComplete(op, status);
  }

  Peer* FindPeer(PeerId id) {
    auto it = peers_.find(id);
    return it == peers_.end() ? nullptr : it->second.get();
  }

  void OnComplete(Op* op, ucs_status_t ucs) {
    if (tearing_down_) {
      OrphanOp(op, absl::CancelledError(Prefix("transport shut down")));
      return;
    }
    if (op->orphaned) {
      ops_.erase(op);
      return;
    }
    Peer* peer = FindPeer(op->peer);
    auto status_for = [&](absl::string_view what) {
      if (ucs == UCS_OK) return absl::OkStatus();
      if (peer != nullptr && !peer->failure.ok()) return peer->failure;
      return FromUcs(ucs, Prefix(absl::StrCat(what, " to peer ", op->peer)));
    };
    switch (op->kind) {
      case OpKind::kPut: {
        absl::Status status = status_for("put");
        if (status.ok()) {
          bytes_put_ += op->bytes;
          ++puts_completed_;
        } else {
          ++puts_failed_;
          if (ucs == UCS_ERR_INVALID_PARAM) {
            status = absl::InvalidArgumentError(
                Prefix(absl::StrCat("peer ", op->peer, " refused a put of ", op->bytes,
                                    " bytes: outside its registered regions")));
          }
        }
        PeerId id = op->peer;
        FinishOp(op, status);
        if (!status.ok() && ucs != UCS_ERR_INVALID_PARAM) FailPeer(id, status);
        return;
      }
      case OpKind::kNotify: {
        absl::Status status = status_for("notification");
        if (status.ok()) ++notifications_sent_;
        PeerId id = op->peer;
        FinishOp(op, status);
        if (!status.ok()) FailPeer(id, status);
        return;
      }
      case OpKind::kEpFlush: {
        absl::Status status = status_for("flush");
        uint64_t seq = op->flush_seq;
        PeerId id = op->peer;
        FinishOp(op, absl::OkStatus());
        if (!status.ok()) {
          FinishFlush(seq, status);
          FailPeer(id, status);
        } else {
          SendFlushRequest(seq);
        }
        return;
      }
      case OpKind::kInternalSend: {
        absl::Status status = status_for("control message");
        uint64_t seq = op->flush_seq;
        PeerId id = op->peer;
        FinishOp(op, absl::OkStatus());
        if (!status.ok() && id != 0) {
          if (seq != 0) FinishFlush(seq, status);
          FailPeer(id, status);
        }
        return;
      }
      case OpKind::kRecv: {
        auto it = sources_.find(op->source_id);
        if (ucs == UCS_OK) {
          bytes_received_ += op->bytes;
        } else if (it != sources_.end()) {
          ++it->second.rejected;
        }
        uint64_t source = op->source_id, seq = op->seq;
        FinishOp(op, absl::OkStatus());
        MarkLanded(source, seq);
        return;
      }
      case OpKind::kMessage: {
        absl::Status status = status_for("message");
        if (status.ok()) {
          ++messages_sent_;
          message_bytes_sent_ += op->bytes;
        }
        PeerId id = op->peer;
        FinishOp(op, status);
        if (!status.ok() && id != 0) FailPeer(id, status);
        return;
      }
      case OpKind::kRecvMessage: {
        Message m = std::move(op->message);
        FinishOp(op, absl::OkStatus());
        if (ucs == UCS_OK) {
          DeliverMessage(std::move(m));
        } else {
          ++messages_rejected_;
        }
        return;
      }
      case OpKind::kGet: {  // RMA get completed (an active-message get finishes by its reply)
        absl::Status status = status_for("get");
        if (status.ok()) bytes_got_ += op->bytes;
        PeerId id = op->peer;
        FinishOp(op, status);
        if (!status.ok()) FailPeer(id, status);
        return;
      }
      case OpKind::kGetRecv: {
        const uint64_t seq = op->get_seq;
        FinishOp(op, absl::OkStatus());
        FinishGet(seq, ucs == UCS_OK ? absl::OkStatus()
                                     : FromUcs(ucs, Prefix("receiving a get reply")));
        return;
      }
      case OpKind::kClose: {
        for (ucp_rkey_h rkey : op->rkeys) ucp_rkey_destroy(rkey);
        op->rkeys.clear();
        FinishOp(op, absl::OkStatus());
        return;
      }
      case OpKind::kFlush:
        break;  // completed by the acknowledgement, never by UCX
    }
  }

  // ---- Peers ----

  absl::StatusOr<PeerId> DoConnect(const std::string& address) {
    if (closing_) return ShutDownError();
    auto cached = peer_by_address_.find(address);
    if (cached != peer_by_address_.end()) {
      Peer* p = FindPeer(cached->second);
      if (p != nullptr && p->failure.ok()) return p->id;
      peer_by_address_.erase(cached);
    }
    // Error mode NONE: UCX 1.13 has no peer-failure support for shared memory and would
    // otherwise route same-host peers over tcp. Failures are found by deadlines instead.
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.address = reinterpret_cast<const ucp_address_t*>(address.data());
    params.err_mode = UCP_ERR_HANDLING_MODE_NONE;
    ucp_ep_h ep = nullptr;
    ucs_status_t s = ucp_ep_create(worker_, &params, &ep);
    if (s != UCS_OK) return FromUcs(s, Prefix("connecting to peer"));
    auto peer = std::make_unique<Peer>();
    peer->id = next_peer_id_++;
    peer->address = address;
    peer->ep = ep;
    peer->lanes = EndpointLanes(ep);
    peer->path =
        options_.put_path == PutPath::kAuto ? ResolvePutPath(peer->lanes) : options_.put_path;
    (peer->path == PutPath::kRma ? rma_peers_ : am_peers_) += 1;
    PeerId id = peer->id;
    peer_by_address_[address] = id;
    peers_[id] = std::move(peer);
    SendHello(ep);
    return id;
  }

  void SendHello(ucp_ep_h ep) {
    Op* op = NewOp(OpKind::kInternalSend, 0, nullptr);
    op->header = HeaderBytes(HelloHeader{source_id_});
    op->payload = worker_address_;
    ucp_request_param_t param = SendParam(op);
    HandleNbx(op, ucp_am_send_nbx(ep, kAmHello, op->header.data(), op->header.size(),
                                  op->payload.data(), op->payload.size(), &param));
  }

  // Where a reply to `source_id` goes: an endpoint of ours to the address of its hello (`*peer`
  // set; created on the first reply, then reused), or, for a sender that sent no hello, UCX's
  // reply endpoint `fallback`. Null when the sender's endpoint has failed (it is gone).
  ucp_ep_h ReplyEndpoint(uint64_t source_id, ucp_ep_h fallback, PeerId* peer) {
    *peer = 0;
    auto it = sources_.find(source_id);
    if (it == sources_.end() || it->second.address.empty()) return fallback;
    absl::StatusOr<PeerId> id = DoConnect(it->second.address);
    if (!id.ok()) return nullptr;
    Peer* p = FindPeer(*id);
    if (p == nullptr || !p->failure.ok()) return nullptr;
    *peer = *id;
    return p->ep;
  }

  // Marks the peer failed, fails its pending operations with `status` and force-closes its
  // endpoint (UCX cancels the requests it still holds).
  void FailPeer(PeerId id, const absl::Status& status) {
    Peer* p = FindPeer(id);
    if (p == nullptr || !p->failure.ok()) return;
    p->failure = status;
    (p->path == PutPath::kRma ? rma_peers_ : am_peers_) -= 1;
    std::vector<uint64_t> flushes;
    for (auto& [seq, op] : flush_waiters_) {
      if (op->peer == id) flushes.push_back(seq);
    }
    for (uint64_t seq : flushes) FinishFlush(seq, status);
    CloseEndpoint(*p, /*force=*/true);
    // Active-message gets waiting for a reply hold no UCX request: finished, not orphaned.
    std::vector<uint64_t> gets;
    for (auto& [seq, op] : get_waiters_) {
      if (op->peer == id) gets.push_back(seq);
    }
    for (uint64_t seq : gets) FinishGet(seq, status);
    std::vector<Op*> remaining;
    for (auto& [ptr, op] : ops_) {
      if (op->peer == id && op->kind != OpKind::kClose && !op->orphaned) remaining.push_back(ptr);
    }
    for (Op* op : remaining) OrphanOp(op, status);
  }

  void CloseEndpoint(Peer& p, bool force) {
    if (p.ep == nullptr) return;
    Op* op = NewOp(OpKind::kClose, p.id, nullptr);
    op->deadline = Clock::now() + std::chrono::milliseconds(options_.shutdown_timeout_ms);
    for (auto& [bytes, rkey] : p.rkeys) op->rkeys.push_back(rkey);
    p.rkeys.clear();
    ucp_request_param_t param = SendParam(op);
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucp_ep_h ep = p.ep;
    p.ep = nullptr;
    HandleNbx(op, ucp_ep_close_nbx(ep, &param));
  }

  absl::StatusOr<ucp_rkey_h> GetRkey(Peer& p, const std::string& packed) {
    auto it = p.rkeys.find(packed);
    if (it != p.rkeys.end()) return it->second;
    ucp_rkey_h rkey = nullptr;
    ucs_status_t s = ucp_ep_rkey_unpack(p.ep, packed.data(), &rkey);
    if (s != UCS_OK) return FromUcs(s, Prefix("unpacking the remote key"));
    p.rkeys.emplace(packed, rkey);
    return rkey;
  }

  // Peer lookup shared by the asynchronous operations; reports and returns null on failure.
  Peer* UsablePeer(PeerId id, DoneCallback& done) {
    if (closing_) {
      done(absl::CancelledError(Prefix("transport shut down")));
      return nullptr;
    }
    Peer* p = FindPeer(id);
    if (p == nullptr) {
      done(absl::NotFoundError(Prefix(absl::StrCat("no peer ", id))));
      return nullptr;
    }
    if (!p->failure.ok()) {
      done(p->failure);
      return nullptr;
    }
    return p;
  }

  void DoPut(PeerId id, const void* local, size_t bytes, uint64_t remote_addr,
             const std::string& rkey, const std::string& owner, DoneCallback done) {
    Peer* p = UsablePeer(id, done);
    if (p == nullptr) return;
    if (!owner.empty() && owner != p->address) {
      done(absl::InvalidArgumentError(Prefix(
          absl::StrCat("Put: the region descriptor belongs to another worker than peer ", id))));
      return;
    }
    if (p->path == PutPath::kRma) {
      absl::StatusOr<ucp_rkey_h> key = GetRkey(*p, rkey);
      if (!key.ok()) {
        done(key.status());
        return;
      }
      Op* op = NewOp(OpKind::kPut, id, std::move(done));
      op->bytes = bytes;
      ucp_request_param_t param = SendParam(op);
      HandleNbx(op, ucp_put_nbx(p->ep, local, bytes, remote_addr, *key, &param));
      return;
    }
    Op* op = NewOp(OpKind::kPut, id, std::move(done));
    op->bytes = bytes;
    op->header = HeaderBytes(PutHeader{source_id_, ++p->am_puts_sent, remote_addr});
    ucp_request_param_t param = SendParam(op);
    HandleNbx(op, ucp_am_send_nbx(p->ep, kAmPut, op->header.data(), op->header.size(), local, bytes,
                                  &param));
  }

  void DoGet(PeerId id, void* local, size_t bytes, uint64_t remote_addr, const std::string& rkey,
             const std::string& owner, DoneCallback done) {
    Peer* p = UsablePeer(id, done);
    if (p == nullptr) return;
    if (!owner.empty() && owner != p->address) {
      done(absl::InvalidArgumentError(Prefix(
          absl::StrCat("Get: the region descriptor belongs to another worker than peer ", id))));
      return;
    }
    Op* op = NewOp(OpKind::kGet, id, std::move(done));
    op->bytes = bytes;
    op->local = local;
    if (p->path == PutPath::kRma) {
      absl::StatusOr<ucp_rkey_h> key = GetRkey(*p, rkey);
      if (!key.ok()) {
        FinishOp(op, key.status());
        return;
      }
      ucp_request_param_t param = SendParam(op);
      HandleNbx(op, ucp_get_nbx(p->ep, local, bytes, remote_addr, *key, &param));
      return;
    }
    // Active messages: ask; the reply (OnGetReplyAm) carries the bytes and finishes `op`.
    op->get_seq = next_get_seq_++;
    get_waiters_[op->get_seq] = op;
    Op* request = NewOp(OpKind::kInternalSend, id, nullptr);
    request->header = HeaderBytes(GetRequestHeader{source_id_, op->get_seq, remote_addr, bytes});
    ucp_request_param_t param = SendParam(request);
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
    HandleNbx(request, ucp_am_send_nbx(p->ep, kAmGetRequest, request->header.data(),
                                       request->header.size(), nullptr, 0, &param));
  }

  // Finishes the active-message get `seq` (if it still waits) with `status`.
  void FinishGet(uint64_t seq, absl::Status status) {
    auto it = get_waiters_.find(seq);
    if (it == get_waiters_.end()) return;
    Op* op = it->second;
    get_waiters_.erase(it);
    if (status.ok()) bytes_got_ += op->bytes;
    FinishOp(op, std::move(status));
  }

  void DoFlush(PeerId id, DoneCallback done) {
    Peer* p = UsablePeer(id, done);
    if (p == nullptr) return;
    Op* flush = NewOp(OpKind::kFlush, id, std::move(done));
    flush->flush_seq = next_flush_seq_++;
    flush_waiters_[flush->flush_seq] = flush;
    Op* ep_flush = NewOp(OpKind::kEpFlush, id, nullptr);
    ep_flush->flush_seq = flush->flush_seq;
    ucp_request_param_t param = SendParam(ep_flush);
    HandleNbx(ep_flush, ucp_ep_flush_nbx(p->ep, &param));
  }

  // Second half of Flush: ask the target to acknowledge once our puts have landed.
  void SendFlushRequest(uint64_t seq) {
    auto it = flush_waiters_.find(seq);
    if (it == flush_waiters_.end()) return;
    Peer* p = FindPeer(it->second->peer);
    if (p == nullptr || p->ep == nullptr) return;
    Op* op = NewOp(OpKind::kInternalSend, p->id, nullptr);
    op->flush_seq = seq;
    op->header = HeaderBytes(FlushRequestHeader{source_id_, seq, p->am_puts_sent});
    ucp_request_param_t param = SendParam(op);
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
    HandleNbx(op, ucp_am_send_nbx(p->ep, kAmFlushRequest, op->header.data(), op->header.size(),
                                  nullptr, 0, &param));
  }

  void FinishFlush(uint64_t seq, absl::Status status) {
    auto it = flush_waiters_.find(seq);
    if (it == flush_waiters_.end()) return;
    Op* op = it->second;
    flush_waiters_.erase(it);
    FinishOp(op, std::move(status));
  }

  void DoNotify(PeerId id, uint32_t tag, std::string payload, DoneCallback done) {
    Peer* p = UsablePeer(id, done);
    if (p == nullptr) return;
    Op* op = NewOp(OpKind::kNotify, id, std::move(done));
    op->header = HeaderBytes(NotifyHeader{source_id_, p->am_puts_sent, tag, 0});
    op->payload = std::move(payload);
    ucp_request_param_t param = SendParam(op);
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_EAGER;
    HandleNbx(op, ucp_am_send_nbx(p->ep, kAmNotify, op->header.data(), op->header.size(),
                                  op->payload.data(), op->payload.size(), &param));
  }

  // `peer` is 0 for a reply (on an endpoint UCX created for the sender): its failure fails no
  // peer, and its deadline only orphans it.
  void DoSendMessage(ucp_ep_h ep, PeerId peer, uint32_t tag, std::string payload,
                     DoneCallback done) {
    Op* op = NewOp(OpKind::kMessage, peer, std::move(done));
    op->header = HeaderBytes(MessageHeader{source_id_, tag, 0});
    op->payload = std::move(payload);
    op->bytes = op->payload.size();
    ucp_request_param_t param = SendParam(op);
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_REPLY;
    HandleNbx(op, ucp_am_send_nbx(ep, kAmMessage, op->header.data(), op->header.size(),
                                  op->payload.data(), op->payload.size(), &param));
  }

  void DeliverMessage(Message m) {
    ++messages_received_;
    message_bytes_received_ += m.payload.size();
    if (message_handler_) {
      message_handler_(std::move(m));
    } else {
      undelivered_messages_.push_back(std::move(m));
    }
  }

  // ---- Target side: active messages ----

  // Start of a registered region containing [addr, addr + length), or null.
  void* FindRegionRange(uint64_t addr, size_t length) {
    auto it = regions_.upper_bound(addr);
    if (it == regions_.begin()) return nullptr;
    --it;
    const uint64_t base = it->first;
    if (addr - base > it->second.size_bytes || length > it->second.size_bytes - (addr - base)) {
      return nullptr;
    }
    return reinterpret_cast<void*>(addr);
  }

  void MarkLanded(uint64_t source_id, uint64_t seq) {
    Source& src = sources_[source_id];
    src.landed.insert(seq);
    while (!src.landed.empty() && *src.landed.begin() == src.watermark + 1) {
      src.landed.erase(src.landed.begin());
      ++src.watermark;
    }
    auto& waiters = src.waiters;
    for (auto it = waiters.begin(); it != waiters.end();) {
      if (it->first <= src.watermark) {
        pending_actions_.push_back(std::move(it->second));
        it = waiters.erase(it);
      } else {
        ++it;
      }
    }
  }

  // Runs `action` (after this progress round) once puts 1..seq from `source_id` have landed.
  void WhenLanded(uint64_t source_id, uint64_t seq, std::function<void()> action) {
    Source& src = sources_[source_id];
    if (src.watermark >= seq) {
      pending_actions_.push_back(std::move(action));
    } else {
      src.waiters.emplace_back(seq, std::move(action));
    }
  }

  static ucs_status_t OnPutAm(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    PutHeader h{};
    if (!ParseHeader(header, header_length, h)) {
      ++self->puts_rejected_;
      return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    }
    void* dest = self->FindRegionRange(h.remote_addr, length);
    if (dest == nullptr) {
      ++self->puts_rejected_;
      ++self->sources_[h.source_id].rejected;
      self->MarkLanded(h.source_id, h.seq);
      return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    }
    if (!rndv) {
      std::memcpy(dest, data, length);
      self->bytes_received_ += length;
      self->MarkLanded(h.source_id, h.seq);
      return UCS_OK;
    }
    // Rendezvous: receive straight into place, started outside this callback.
    Op* op = self->NewOp(OpKind::kRecv, 0, nullptr);
    op->source_id = h.source_id;
    op->seq = h.seq;
    op->bytes = length;
    self->pending_actions_.push_back([self, op, data, dest, length] {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      p.cb.recv_am = &Impl::OnRecvComplete;
      p.user_data = op;
      self->HandleNbx(op, ucp_am_recv_data_nbx(self->worker_, data, dest, length, &p));
    });
    return UCS_INPROGRESS;
  }

  static ucs_status_t OnFlushRequestAm(void* arg, const void* header, size_t header_length,
                                       void* /*data*/, size_t /*length*/,
                                       const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    FlushRequestHeader h{};
    if (!ParseHeader(header, header_length, h)) return UCS_OK;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) return UCS_OK;
    ucp_ep_h reply_ep = param->reply_ep;
    self->WhenLanded(h.source_id, h.puts_sent, [self, reply_ep, h] {
      if (self->closing_) return;
      PeerId peer = 0;
      ucp_ep_h ep = self->ReplyEndpoint(h.source_id, reply_ep, &peer);
      if (ep == nullptr) return;  // the writer is gone: nobody waits for the reply
      Op* op = self->NewOp(OpKind::kInternalSend, 0, nullptr);
      op->header = HeaderBytes(FlushReplyHeader{h.flush_seq, self->sources_[h.source_id].rejected});
      ucp_request_param_t p = self->SendParam(op);
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_EAGER;
      self->HandleNbx(op, ucp_am_send_nbx(ep, kAmFlushReply, op->header.data(),
                                          op->header.size(), nullptr, 0, &p));
    });
    return UCS_OK;
  }

  static ucs_status_t OnFlushReplyAm(void* arg, const void* header, size_t header_length,
                                     void* /*data*/, size_t /*length*/,
                                     const ucp_am_recv_param_t* /*param*/) {
    auto* self = static_cast<Impl*>(arg);
    FlushReplyHeader h{};
    if (!ParseHeader(header, header_length, h)) return UCS_OK;
    self->pending_actions_.push_back([self, h] {
      auto it = self->flush_waiters_.find(h.flush_seq);
      if (it == self->flush_waiters_.end()) return;  // already failed or timed out
      Peer* p = self->FindPeer(it->second->peer);
      absl::Status status;
      if (p != nullptr && h.rejected_puts > p->rejected_seen) {
        status = absl::InvalidArgumentError(self->Prefix(
            absl::StrCat("peer ", p->id, " refused ", h.rejected_puts - p->rejected_seen,
                         " puts: outside its registered regions")));
        p->rejected_seen = h.rejected_puts;
      }
      self->FinishFlush(h.flush_seq, status);
    });
    return UCS_OK;
  }

  // Target side of an active-message get: the bytes straight from the registered region (which
  // outlives the send), or a refusal.
  static ucs_status_t OnGetRequestAm(void* arg, const void* header, size_t header_length,
                                     void* /*data*/, size_t /*length*/,
                                     const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    GetRequestHeader h{};
    if (!ParseHeader(header, header_length, h)) return UCS_OK;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) return UCS_OK;
    ucp_ep_h reply_ep = param->reply_ep;
    self->pending_actions_.push_back([self, reply_ep, h] {
      if (self->closing_) return;
      PeerId peer = 0;
      ucp_ep_h ep = self->ReplyEndpoint(h.source_id, reply_ep, &peer);
      if (ep == nullptr) return;  // the reader is gone
      void* source = self->FindRegionRange(h.remote_addr, h.bytes);
      Op* op = self->NewOp(OpKind::kInternalSend, 0, nullptr);
      op->header = HeaderBytes(GetReplyHeader{h.get_seq, source == nullptr ? 1u : 0u});
      ucp_request_param_t p = self->SendParam(op);
      self->HandleNbx(op, ucp_am_send_nbx(ep, kAmGetReply, op->header.data(), op->header.size(),
                                          source, source == nullptr ? 0 : h.bytes, &p));
    });
    return UCS_OK;
  }

  static ucs_status_t OnGetReplyAm(void* arg, const void* header, size_t header_length,
                                   void* data, size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    GetReplyHeader h{};
    if (!ParseHeader(header, header_length, h)) return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    auto it = self->get_waiters_.find(h.get_seq);
    if (it == self->get_waiters_.end()) return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;  // failed
    Op* get = it->second;
    if (h.refused != 0 || length != get->bytes) {
      self->FinishGet(h.get_seq,
                      h.refused != 0
                          ? absl::InvalidArgumentError(self->Prefix(absl::StrCat(
                                "peer ", get->peer, " refused a get of ", get->bytes,
                                " bytes: outside its registered regions")))
                          : absl::DataLossError(self->Prefix(absl::StrCat(
                                "get reply of ", length, " bytes, ", get->bytes, " asked"))));
      return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    }
    if (!rndv) {
      std::memcpy(get->local, data, length);
      self->FinishGet(h.get_seq, absl::OkStatus());
      return UCS_OK;
    }
    // Rendezvous: received straight into the get's buffer, started outside this callback.
    Op* op = self->NewOp(OpKind::kGetRecv, 0, nullptr);
    op->get_seq = h.get_seq;
    op->bytes = length;
    void* local = get->local;
    self->pending_actions_.push_back([self, op, data, local, length] {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      p.cb.recv_am = &Impl::OnRecvComplete;
      p.user_data = op;
      self->HandleNbx(op, ucp_am_recv_data_nbx(self->worker_, data, local, length, &p));
    });
    return UCS_INPROGRESS;
  }

  static ucs_status_t OnNotifyAm(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    NotifyHeader h{};
    if (!ParseHeader(header, header_length, h) ||
        (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
      return UCS_OK;  // malformed, or a rendezvous we never ask for: drop
    }
    Notification n;
    n.source_id = h.source_id;
    n.tag = h.tag;
    n.payload.assign(static_cast<const char*>(data), length);
    self->WhenLanded(h.source_id, h.puts_sent, [self, n = std::move(n)]() mutable {
      ++self->notifications_received_;
      if (self->handler_) {
        self->handler_(std::move(n));
      } else {
        self->undelivered_.push_back(std::move(n));
      }
    });
    return UCS_OK;
  }

  static ucs_status_t OnHelloAm(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    HelloHeader h{};
    if (!ParseHeader(header, header_length, h) || length == 0 || length > kMaxWorkerAddressBytes ||
        (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
      return UCS_OK;  // no hello: replies to it go over UCX's reply endpoint
    }
    self->sources_[h.source_id].address.assign(static_cast<const char*>(data), length);
    return UCS_OK;
  }

  static ucs_status_t OnMessageAm(void* arg, const void* header, size_t header_length, void* data,
                                  size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    MessageHeader h{};
    if (!ParseHeader(header, header_length, h) || length > self->options_.max_message_bytes ||
        (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0 || self->closing_) {
      ++self->messages_rejected_;
      return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;  // a refused rendezvous fails the send
    }
    Message m;
    m.source_id = h.source_id;
    m.tag = h.tag;
    m.reply_to = ReplyTo{h.source_id, reinterpret_cast<uintptr_t>(param->reply_ep)};
    if (!rndv) {
      m.payload.assign(static_cast<const char*>(data), length);
      self->pending_actions_.push_back(
          [self, m = std::make_shared<Message>(std::move(m))] { self->DeliverMessage(std::move(*m)); });
      return UCS_OK;
    }
    // Rendezvous: receive into the message's own buffer, started outside this callback.
    Op* op = self->NewOp(OpKind::kRecvMessage, 0, nullptr);
    op->message = std::move(m);
    op->message.payload.resize(length);
    op->bytes = length;
    self->pending_actions_.push_back([self, op, data, length] {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      p.cb.recv_am = &Impl::OnRecvComplete;
      p.user_data = op;
      self->HandleNbx(op, ucp_am_recv_data_nbx(self->worker_, data, op->message.payload.data(),
                                               length, &p));
    });
    return UCS_INPROGRESS;
  }

  // ---- Regions ----

  absl::StatusOr<Region> DoRegisterRegion(size_t size_bytes) {
    if (closing_) return ShutDownError();
    ucp_mem_map_params_t params{};
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    params.length = size_bytes;
    params.flags = UCP_MEM_MAP_ALLOCATE;
    ucp_mem_h memh = nullptr;
    ucs_status_t s = ucp_mem_map(context_, &params, &memh);
    if (s != UCS_OK) {
      return FromUcs(s, Prefix(absl::StrCat("allocating a region of ", size_bytes, " bytes")));
    }
    ucp_mem_attr_t attr{};
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
    s = ucp_mem_query(memh, &attr);
    void* rkey_buffer = nullptr;
    size_t rkey_size = 0;
    if (s == UCS_OK) s = ucp_rkey_pack(context_, memh, &rkey_buffer, &rkey_size);
    if (s != UCS_OK) {
      ucp_mem_unmap(context_, memh);
      return FromUcs(s, Prefix("describing a new region"));
    }
    Region region;
    region.id = next_region_id_++;
    region.base = attr.address;
    region.size_bytes = size_bytes;
    region.rkey.assign(static_cast<const char*>(rkey_buffer), rkey_size);
    ucp_rkey_buffer_release(rkey_buffer);
    // First writes to fresh pages run at ~2 GB/s (page faults): take them now.
    std::memset(region.base, 0, size_bytes);
    const auto base = reinterpret_cast<uint64_t>(region.base);
    regions_[base] = RegionRecord{region.id, memh, size_bytes};
    region_base_by_id_[region.id] = base;
    return region;
  }

  // ---- Shutdown (progress thread, after Loop) ----

  void Teardown() {
    closing_ = true;
    RunTasks();  // posted before Shutdown: they see closing_ and fail with Cancelled
    const absl::Status cancelled = absl::CancelledError(Prefix("transport shut down"));
    std::vector<uint64_t> flushes;
    for (auto& [seq, op] : flush_waiters_) flushes.push_back(seq);
    for (uint64_t seq : flushes) FinishFlush(seq, cancelled);
    std::vector<PeerId> ids;
    for (auto& [id, p] : peers_) ids.push_back(id);
    for (PeerId id : ids) {
      Peer& p = *peers_[id];
      bool pending = false;
      for (auto& [ptr, op] : ops_) pending |= (op->peer == id && !op->orphaned);
      // A peer with work still pending after the drain is wedged or dead: force. Otherwise
      // close politely, flushing what is left.
      if (pending) {
        FailPeer(id, cancelled);
      } else {
        CloseEndpoint(p, /*force=*/false);
      }
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(options_.shutdown_timeout_ms);
    while (live_ops_ > 0 && Clock::now() < deadline) {
      ucp_worker_progress(worker_);
      RunPendingActions();
    }
    TeardownUcx();
  }

  void TeardownUcx() {
    tearing_down_ = true;
    for (auto& [ptr, op] : ops_) {
      if (op->kind == OpKind::kClose) {
        for (ucp_rkey_h rkey : op->rkeys) ucp_rkey_destroy(rkey);
        op->rkeys.clear();
      }
      if (op->request != nullptr && worker_ != nullptr) ucp_request_cancel(worker_, op->request);
    }
    for (auto& [id, p] : peers_) {
      for (auto& [bytes, rkey] : p->rkeys) ucp_rkey_destroy(rkey);
      p->rkeys.clear();
    }
    if (worker_ != nullptr) {
      ucp_worker_destroy(worker_);
      worker_ = nullptr;
    }
    // UCX will not touch the remaining requests (or their buffers) any more.
    const absl::Status cancelled = absl::CancelledError(Prefix("transport shut down"));
    std::vector<Op*> left;
    for (auto& [ptr, op] : ops_) left.push_back(ptr);
    for (Op* op : left) {
      op->orphaned = true;
      if (op->done) {
        DoneCallback done = std::move(op->done);
        op->done = nullptr;
        done(cancelled);
      }
    }
    ops_.clear();
    live_ops_ = 0;
    flush_waiters_.clear();
    get_waiters_.clear();
    for (auto& [base, record] : regions_) ucp_mem_unmap(context_, record.memh);
    regions_.clear();
    region_base_by_id_.clear();
    if (context_ != nullptr) {
      ucp_cleanup(context_);
      context_ = nullptr;
    }
    if (epoll_fd_ >= 0) {
      ::close(epoll_fd_);
      epoll_fd_ = -1;
    }
  }

  const TransportOptions options_;
  uint64_t source_id_ = 0;
  std::string worker_address_;  // set before Start returns; immutable afterwards
  bool cuda_memory_ = false;     // set before Start returns: UCX can move CUDA memory

  // Mailbox.
  std::mutex mu_;
  std::deque<absl::AnyInvocable<void()>> tasks_;
  bool accepting_ = true;
  bool shutdown_started_ = false;
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> has_tasks_{false};
  std::atomic<bool> sleeping_{false};  // the progress thread is in (or entering) epoll_wait
  int event_fd_ = -1;
  std::thread thread_;
  std::thread::id thread_id_;

  // Everything below is owned by the progress thread.
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int worker_fd_ = -1;
  int epoll_fd_ = -1;
  bool closing_ = false;       // Teardown started: new operations are cancelled
  bool tearing_down_ = false;  // the worker is being destroyed
  std::unordered_map<Op*, std::unique_ptr<Op>> ops_;
  int64_t live_ops_ = 0;  // ops_ not yet reported
  std::map<uint64_t, Op*> flush_waiters_;
  uint64_t next_flush_seq_ = 1;
  std::unordered_map<PeerId, std::unique_ptr<Peer>> peers_;
  std::unordered_map<std::string, PeerId> peer_by_address_;
  PeerId next_peer_id_ = 1;
  std::unordered_map<uint64_t, Source> sources_;
  std::vector<std::function<void()>> pending_actions_;
  std::map<uint64_t, RegionRecord> regions_;  // by base address
  std::unordered_map<uint64_t, uint64_t> region_base_by_id_;
  uint64_t next_region_id_ = 1;
  NotificationHandler handler_;
  std::deque<Notification> undelivered_;
  MessageHandler message_handler_;
  std::deque<Message> undelivered_messages_;

  // Read from any thread.
  std::atomic<int64_t> rma_peers_{0};
  std::atomic<int64_t> am_peers_{0};
  std::atomic<uint64_t> bytes_put_{0};
  std::atomic<uint64_t> bytes_got_{0};
  std::map<uint64_t, Op*> get_waiters_;  // active-message gets by get_seq (progress thread)
  uint64_t next_get_seq_ = 1;
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> puts_completed_{0};
  std::atomic<uint64_t> puts_failed_{0};
  std::atomic<uint64_t> puts_rejected_{0};
  std::atomic<uint64_t> notifications_sent_{0};
  std::atomic<uint64_t> notifications_received_{0};
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> messages_received_{0};
  std::atomic<uint64_t> message_bytes_sent_{0};
  std::atomic<uint64_t> message_bytes_received_{0};
  std::atomic<uint64_t> messages_rejected_{0};
};

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(
    const TransportOptions& options) {
  if (options.operation_timeout_ms <= 0 || options.shutdown_timeout_ms < 0) {
    return absl::InvalidArgumentError(options.name + ": timeouts must be positive");
  }
  auto impl = std::make_unique<Impl>(options);
  absl::Status status = impl->Start();
  if (!status.ok()) return status;
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(impl)));
}

UcxTransport::UcxTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UcxTransport::~UcxTransport() { Shutdown(); }
void UcxTransport::Shutdown() { impl_->Shutdown(); }
const std::string& UcxTransport::WorkerAddress() const { return impl_->worker_address(); }
bool UcxTransport::ReachesCudaMemory() const { return impl_->cuda_memory(); }
uint64_t UcxTransport::SourceId() const { return impl_->source_id(); }
absl::StatusOr<Region> UcxTransport::RegisterRegion(size_t size_bytes) {
  return impl_->RegisterRegion(size_bytes);
}
absl::Status UcxTransport::ReleaseRegion(uint64_t region_id) {
  return impl_->ReleaseRegion(region_id);
}
RegionDescriptor UcxTransport::Describe(const Region& region) const {
  RegionDescriptor d;
  d.worker_address = impl_->worker_address();
  d.remote_addr = reinterpret_cast<uint64_t>(region.base);
  d.size_bytes = region.size_bytes;
  d.rkey = region.rkey;
  return d;
}
absl::StatusOr<PeerId> UcxTransport::Connect(absl::string_view worker_address) {
  return impl_->Connect(worker_address);
}
absl::StatusOr<PeerInfo> UcxTransport::GetPeerInfo(PeerId peer) { return impl_->GetPeerInfo(peer); }
void UcxTransport::Put(PeerId peer, const void* local, size_t bytes, const RegionDescriptor& remote,
                       uint64_t remote_offset, DoneCallback done) {
  impl_->Put(peer, local, bytes, remote, remote_offset, std::move(done));
}
void UcxTransport::Flush(PeerId peer, DoneCallback done) { impl_->Flush(peer, std::move(done)); }
void UcxTransport::Get(PeerId peer, void* local, size_t bytes, const RegionDescriptor& remote,
                       uint64_t remote_offset, DoneCallback done) {
  impl_->Get(peer, local, bytes, remote, remote_offset, std::move(done));
}
void UcxTransport::SendNotification(PeerId peer, uint32_t tag, absl::string_view payload,
                                    DoneCallback done) {
  impl_->SendNotification(peer, tag, payload, std::move(done));
}
void UcxTransport::SetNotificationHandler(NotificationHandler handler) {
  impl_->SetNotificationHandler(std::move(handler));
}
void UcxTransport::SendMessage(PeerId peer, uint32_t tag, std::string payload,
                              DoneCallback done) {
  impl_->SendMessage(peer, tag, std::move(payload), std::move(done));
}
void UcxTransport::SendReply(const ReplyTo& to, uint32_t tag, std::string payload,
                            DoneCallback done) {
  impl_->SendReply(to, tag, std::move(payload), std::move(done));
}
void UcxTransport::SetMessageHandler(MessageHandler handler) {
  impl_->SetMessageHandler(std::move(handler));
}
TransportCapabilities UcxTransport::Capabilities() const { return impl_->Capabilities(); }
TransportStats UcxTransport::Stats() const { return impl_->Stats(); }

std::string UcxTlsDescription() {
  const char* tls = std::getenv("UCX_TLS");
  return std::string("ucx tls=") + (tls != nullptr ? tls : "all");
}

}  // namespace splitmoe::transfer
