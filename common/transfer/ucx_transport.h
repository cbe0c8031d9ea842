// UcxTransport: the one-sided transport that carries MLA latents from prefill workers into the
// paged latent cache of decode workers. One transport interface in the Mooncake/NIXL sense:
// register memory (RegisterRegion), describe it to a peer (RegionDescriptor), write into it
// (Put), make the writes visible (Flush), and tell the peer (SendNotification). Beside that,
// request/reply traffic of any size (SendMessage / SendReply, the expert data plane): a message
// reaches the peer's message handler whole, with a ReplyTo to answer it. Every endpoint a
// transport creates first sends a hello with its worker address; answers (and flush replies)
// go over an endpoint the receiver creates to that address and owns, never over UCX's reply
// endpoint, which UCX destroys when the sender dies (answering on it then crashed).
//
// Put paths. Where UCX has a real RMA lane to the peer (shared memory, RDMA) a Put is a
// ucp_put_nbx into the peer's region. Where the only lane is tcp, UCX would emulate puts about
// two orders of magnitude slower than tcp itself (measured in the shared MEASURED.md notes), so the
// transport moves the bytes with active messages instead: the target's progress thread lands
// them at the same offset of the same region (rendezvous receives go straight into place).
// The caller's API is the same; PeerInfo() / Capabilities() say which path each peer uses.
//
// Ordering contract: Put ... Put, then Flush, then SendNotification. When Flush's callback
// reports OK every earlier Put to that peer is in the target's memory (RMA: ucp_ep_flush; both
// paths: an acknowledgement round trip from the target's progress thread, which also proves the
// peer is alive). On the active-message path a notification is additionally held back on the
// target until every earlier Put from the same initiator has landed.
//
// Threading. The transport owns one progress thread; it alone touches the UCX context, worker,
// endpoints and memory handles (the context runs in single-thread mode). All public methods are
// safe on any thread. Asynchronous operations report exactly once through their DoneCallback:
// inline on the calling thread when refused before reaching UCX (bad arguments, unknown peer,
// shut down), otherwise on the progress thread. Callbacks and the notification handler run on
// the progress thread and MUST NOT BLOCK (post a message to an actor); they may call Put,
// Flush and SendNotification, but not the synchronous Connect / RegisterRegion / PeerInfo,
// which return FailedPrecondition there. The progress thread sleeps on the worker's event fd
// when idle and polls while operations are in flight.
//
// Failures. Every operation has a deadline (TransportOptions::operation_timeout_ms). A peer
// whose operation times out or whose endpoint reports an error is marked failed: its pending
// operations complete with that status and later ones are refused with it (Connect again to
// retry). Shared memory has no UCX peer-failure detection in 1.13, so a dead shm peer is found
// by Flush's acknowledgement timing out (DeadlineExceeded).
//
// Example (decode side owns the region, prefill side writes):
//
//   // decode
//   SPLITMOE_ASSIGN_OR_RETURN(auto t, UcxTransport::Create({.name = "decode-0"}));
//   SPLITMOE_ASSIGN_OR_RETURN(Region cache, t->RegisterRegion(64 << 20));
//   t->SetNotificationHandler([&](Notification n) { actor.Send(LatentsWritten{...}); });
//   Reply(t->Describe(cache).Serialize());
//
//   // prefill
//   SPLITMOE_ASSIGN_OR_RETURN(RegionDescriptor remote, RegionDescriptor::Parse(bytes));
//   SPLITMOE_ASSIGN_OR_RETURN(PeerId peer, t->Connect(remote.worker_address));
//   t->Put(peer, latents, n_bytes, remote, block_offset, on_put_done);
//   t->Flush(peer, [&](absl::Status s) { if (s.ok()) t->SendNotification(peer, kLayerDone, ...);
//   });
#ifndef SPLITMOE_COMMON_TRANSFER_UCX_TRANSPORT_H_
#define SPLITMOE_COMMON_TRANSFER_UCX_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/transfer/region_descriptor.h"

namespace splitmoe::transfer {

// How Put moves bytes to a peer.
enum class PutPath {
  kAuto,           // per peer: kRma when UCX has a non-tcp RMA lane to it, else kActiveMessage
  kRma,            // ucp_put_nbx into the remote region
  kActiveMessage,  // active messages landed in place by the target's progress thread
};
absl::string_view PutPathName(PutPath path);

struct TransportOptions {
  std::string name = "transfer";  // prefixes error messages
  PutPath put_path = PutPath::kAuto;
  int64_t operation_timeout_ms = 10000;  // Put / Flush / SendNotification / Connect
  int64_t shutdown_timeout_ms = 2000;    // how long Shutdown waits for in-flight operations
  // Larger messages are refused by the receiver (the sender's SendMessage fails); nothing is
  // allocated for them.
  size_t max_message_bytes = size_t{256} << 20;
  // After its last activity the progress thread keeps polling (yielding the core to any thread
  // that wants it) this long before it sleeps: a thread woken from sleep costs ~30 us per
  // hand-off on the project's VMs, a polling one ~1 us. 0: sleep at once.
  int64_t busy_poll_us = 0;
};

using PeerId = uint64_t;
using DoneCallback = absl::AnyInvocable<void(absl::Status)>;

// A registered, UCX-allocated (UCP_MEM_MAP_ALLOCATE) region whose pages were touched once at
// registration. Lives until ReleaseRegion or transport shutdown.
struct Region {
  uint64_t id = 0;
  void* base = nullptr;
  size_t size_bytes = 0;
  std::string rkey;  // packed remote key
};

struct Notification {
  uint64_t source_id = 0;  // the sending transport's SourceId()
  uint32_t tag = 0;
  std::string payload;
};
using NotificationHandler = absl::AnyInvocable<void(Notification)>;

// Where a message came from, to answer it (SendReply). Opaque; valid while this transport runs.
struct ReplyTo {
  uint64_t source_id = 0;
  uintptr_t endpoint = 0;
};
struct Message {
  uint64_t source_id = 0;  // the sending transport's SourceId()
  uint32_t tag = 0;
  std::string payload;
  ReplyTo reply_to;
};
using MessageHandler = absl::AnyInvocable<void(Message)>;

struct PeerInfo {
  PutPath put_path = PutPath::kAuto;  // resolved: kRma or kActiveMessage
  std::string lanes;                  // UCX's description of the endpoint's lanes
};

struct TransportCapabilities {
  bool rma = true;              // one-sided puts where a lane allows
  bool active_messages = true;  // notifications; puts over tcp
  PutPath configured_put_path = PutPath::kAuto;
  int64_t rma_peers = 0;  // connected peers per resolved put path
  int64_t active_message_peers = 0;
  std::string Summary() const;  // e.g. "put=auto (rma peers 1, am peers 0)"
};

struct TransportStats {
  uint64_t bytes_put = 0;       // completed Puts from here, either path
  uint64_t bytes_received = 0;  // landed here by the active-message path (RMA is invisible)
  uint64_t puts_completed = 0;
  uint64_t puts_failed = 0;
  uint64_t puts_rejected = 0;  // active-message puts here outside every region
  uint64_t notifications_sent = 0;
  uint64_t notifications_received = 0;
  uint64_t messages_sent = 0;  // SendMessage and SendReply, completed
  uint64_t messages_received = 0;
  uint64_t message_bytes_sent = 0;
  uint64_t message_bytes_received = 0;
  uint64_t messages_rejected = 0;  // malformed, or larger than max_message_bytes
};

// "ucx tls=<UCX_TLS>" ("all" when unset): the transports this process lets UCX use, as workers
// report it to the router (status shows it).
std::string UcxTlsDescription();

class UcxTransport {
 public:
  // Starts the progress thread and creates the UCX context (RMA | AM | WAKEUP) and worker on
  // it. UCX_* environment variables (UCX_TLS, UCX_NET_DEVICES, ...) apply as UCX reads them.
  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(const TransportOptions& options);

  UcxTransport(const UcxTransport&) = delete;
  UcxTransport& operator=(const UcxTransport&) = delete;
  // Shutdown(). Must not run on the progress thread (i.e. inside a callback).
  ~UcxTransport();

  // Refuses new operations, waits up to shutdown_timeout_ms for those in flight, fails the rest
  // with Cancelled, closes endpoints and frees every UCX resource. Idempotent.
  void Shutdown();

  // This worker's UCX address; ship it to peers.
  const std::string& WorkerAddress() const;
  // Whether this UCX build can move CUDA device memory (a CUDA transport: cuda_copy, cuda_ipc,
  // gdr_copy); Debian's has none.
  bool ReachesCudaMemory() const;
  // Random per-transport id carried in active-message headers (Notification::source_id).
  uint64_t SourceId() const;

  // Allocates and registers `size_bytes` with UCP_MEM_MAP_ALLOCATE and touches every page.
  absl::StatusOr<Region> RegisterRegion(size_t size_bytes);
  // NotFound for an unknown id. Peers must no longer write to it.
  absl::Status ReleaseRegion(uint64_t region_id);
  RegionDescriptor Describe(const Region& region) const;

  // Endpoint to the worker at `worker_address`, cached per address (a failed one is replaced).
  absl::StatusOr<PeerId> Connect(absl::string_view worker_address);
  absl::StatusOr<PeerInfo> GetPeerInfo(PeerId peer);

  // Writes local[0, bytes) to remote's region at [remote_offset, remote_offset + bytes).
  // `local` must stay valid and unchanged until `done` runs. InvalidArgument (inline) when the
  // range is outside the descriptor or the descriptor belongs to another worker than `peer`.
  void Put(PeerId peer, const void* local, size_t bytes, const RegionDescriptor& remote,
           uint64_t remote_offset, DoneCallback done);
  // OK once every earlier Put to `peer` has landed in the target's memory.
  void Flush(PeerId peer, DoneCallback done);
  // Reads remote's region at [remote_offset, remote_offset + bytes) into local[0, bytes), which
  // must stay valid until `done`; OK means the bytes are in `local`. One-sided (ucp_get) on the
  // RMA path; on the active-message path a request the target answers from its registered
  // regions (InvalidArgument when the range lies outside them). A prefill worker reads a cached
  // prompt prefix's latents out of a decode worker's cache this way.
  void Get(PeerId peer, void* local, size_t bytes, const RegionDescriptor& remote,
           uint64_t remote_offset, DoneCallback done);
  // Sends (tag, payload) to the peer's notification handler. `payload` is copied; at most
  // kMaxNotificationBytes.
  void SendNotification(PeerId peer, uint32_t tag, absl::string_view payload, DoneCallback done);
  static constexpr size_t kMaxNotificationBytes = 64 << 10;

  // Handler for notifications arriving here; runs on the progress thread and must not block.
  // Notifications that arrive before a handler is set are queued and delivered to it.
  void SetNotificationHandler(NotificationHandler handler);

  // Sends (tag, payload) to the peer's message handler: eagerly when small, by rendezvous
  // (received straight into the message's buffer) when large. `done` runs once the bytes have
  // left (eager) or the peer has them (rendezvous), or with the failure (the peer is then failed
  // as for a Put). A message the receiver refuses (malformed, over its max_message_bytes) fails
  // the send when it went by rendezvous; an eager one is dropped and counted in the receiver's
  // messages_rejected: the request/reply protocol on top notices by its own deadline.
  void SendMessage(PeerId peer, uint32_t tag, std::string payload, DoneCallback done);
  // Answers a message received here: over this transport's own endpoint to the sender's hello
  // address (made on the first answer, then reused; a ReplyTo may be kept while the answer is
  // computed), or UCX's reply endpoint for a sender that sent no hello. A sender that is gone
  // fails the answer (UNAVAILABLE, to `done`), never the process.
  void SendReply(const ReplyTo& to, uint32_t tag, std::string payload, DoneCallback done);
  // Handler for messages (and replies) arriving here; runs on the progress thread and must not
  // block. Messages that arrive before a handler is set are queued and delivered to it.
  void SetMessageHandler(MessageHandler handler);

  TransportCapabilities Capabilities() const;
  TransportStats Stats() const;

 private:
  class Impl;
  explicit UcxTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitmoe::transfer

#endif  // SPLITMOE_COMMON_TRANSFER_UCX_TRANSPORT_H_
