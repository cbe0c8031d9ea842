// The UCX expert transport (`--moe-transport ucx`): MoE batches from an attention worker to an
// expert replica, and their partial sums back, as UCX active messages — shared memory between
// processes of one host, tcp (or RDMA) between hosts, whatever UCX_TLS allows — instead of a gRPC
// stream. Both directions carry the same ExpertBatch / ExpertResult messages as the gRPC stream
// (one wire format, so the fallback and this path compute the same thing); large ones go by
// rendezvous, received straight into their buffer. The expert answers on the endpoint the batch
// came by: it never connects back.
//
// Attention side: one UcxExpertLink per worker (one UCX worker, one progress thread); a channel
// per replica. A UCX channel also keeps the replica's gRPC ExpertCompute stream open, idle: a
// replica that dies breaks that stream at once (the kernel closes its socket), and the channel
// then fails its outstanding batches, so a killed replica is noticed by its broken connection on
// either transport — UCX over shared memory has no peer-failure detection of its own (1.13).
//
// Expert side: UcxExpertServer receives batches on the progress thread and hands each to the
// experts actor (expert_service), whose answer it sends back.
//
// Threading: Connect may be called from any thread but the progress thread; Send from any
// thread; `done` runs on the link's progress thread (or inline when refused) and must not block.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto link, UcxExpertLink::Create("decode-moe"));
//   SPLITMOE_ASSIGN_OR_RETURN(auto channel, link->Connect(replica, absl::Seconds(1)));
//   channel->Send(std::move(batch), [](absl::StatusOr<v1::ExpertResult> r) { ... });
#ifndef SPLITMOE_COMMON_EXPERT_PLANE_UCX_EXPERT_H_
#define SPLITMOE_COMMON_EXPERT_PLANE_UCX_EXPERT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/expert_plane/expert_client.h"
#include "common/transfer/ucx_transport.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::expert_plane {

// Message tags of the expert data plane on a UcxTransport.
inline constexpr uint32_t kExpertBatchTag = 1;   // ExpertBatch, attention worker -> replica
inline constexpr uint32_t kExpertResultTag = 2;  // ExpertResult, replica -> attention worker

// A UcxTransport for expert traffic, both ends: `busy_poll` as TransportOptions::busy_poll_us,
// `handler` for what arrives. Unavailable (naming the cause) when UCX cannot start.
absl::StatusOr<std::unique_ptr<transfer::UcxTransport>> StartExpertTransport(
    absl::string_view name, absl::Duration busy_poll, transfer::MessageHandler handler);

class UcxExpertLink {
 public:
  // Unavailable when UCX cannot start (no usable transport).
  // `busy_poll`: TransportOptions::busy_poll_us of its progress thread.
  static absl::StatusOr<std::unique_ptr<UcxExpertLink>> Create(absl::string_view name,
                                                               absl::Duration busy_poll);
  // Fails every batch still waiting (Unavailable). Channels must be gone first.
  ~UcxExpertLink();

  // A channel to `replica` (which must advertise a ucx_worker_address): batches over UCX, the
  // gRPC stream beside it for liveness. FailedPrecondition when UCX finds no path to the
  // replica (no transport in common: its gRPC stream may still serve), Unavailable when the
  // replica cannot be reached at all.
  absl::StatusOr<std::unique_ptr<ExpertChannel>> Connect(const v1::ExpertReplica& replica,
                                                         absl::Duration connect_timeout);

  transfer::TransportStats Stats() const { return transport_->Stats(); }

 private:
  class Channel;
  struct Waiting {
    uint64_t channel = 0;
    ExpertChannel::Done done;
  };
  UcxExpertLink() = default;
  // Progress thread: a replica's answer.
  void OnMessage(transfer::Message m);
  // Registers a batch of `channel`; false (and `done` not kept) when the channel is broken.
  bool Expect(uint64_t channel, uint64_t batch_id, ExpertChannel::Done& done);
  // Fails every batch of `channel` with `status` and remembers it as broken.
  void Fail(uint64_t channel, const absl::Status& status);
  // Fails one batch (its send failed).
  void FailBatch(uint64_t batch_id, const absl::Status& status);
  absl::Status Broken(uint64_t channel) const;
  // The channel is gone: its batches fail, its state is forgotten.
  void Close(uint64_t channel);

  std::unique_ptr<transfer::UcxTransport> transport_;
  mutable std::mutex mu_;  // guards everything below
  uint64_t next_channel_ = 1;
  std::map<uint64_t, Waiting> waiting_;             // by batch id
  std::map<uint64_t, absl::Status> broken_;         // by channel
};

}  // namespace splitmoe::expert_plane

#endif  // SPLITMOE_COMMON_EXPERT_PLANE_UCX_EXPERT_H_
