// ExpertChannel: how an attention worker sends MoE batches to one expert replica, whatever the
// transport: ExpertClient (a gRPC ExpertCompute stream, here) or the UCX channel
// (ucx_expert.h). Send() never blocks on the network and each batch's `done` runs exactly once,
// with the result or with Unavailable when the channel is (or becomes) broken or closes.
//
// ExpertClient: a long-lived ExpertCompute stream to one expert replica. Send() may be called
// from any thread and never blocks on the network: batches are queued and written by the
// client's writer thread, so a replica that stops reading (stalled, flow control closed) holds
// up nothing but its own stream. Each batch's `done` runs exactly once — with the result, from
// the reader thread, or with Unavailable when the stream is (or becomes) broken or the client
// closes — so a caller waiting on a dead replica learns of it instead of hanging.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto client, ExpertClient::Connect("127.0.0.1:7002"));
//   client->Send(std::move(batch), [](absl::StatusOr<v1::ExpertResult> r) { ... });
#ifndef SPLITMOE_COMMON_EXPERT_PLANE_EXPERT_CLIENT_H_
#define SPLITMOE_COMMON_EXPERT_PLANE_EXPERT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::expert_plane {

class ExpertChannel {
 public:
  using Done = std::function<void(absl::StatusOr<v1::ExpertResult>)>;
  virtual ~ExpertChannel() = default;
  virtual void Send(v1::ExpertBatch batch, Done done) = 0;
  // The replica's gRPC address (its identity in the routing table).
  virtual const std::string& address() const = 0;
  virtual bool broken() const = 0;
  // "grpc" or "ucx": what carries the batches.
  virtual absl::string_view transport() const = 0;
};

class ExpertClient final : public ExpertChannel {
 public:
  // Runs once, on the reader or writer thread (or in the destructor), when the stream breaks.
  using OnBreak = std::function<void(const absl::Status&)>;
  // Unavailable when the replica cannot be reached within `connect_timeout`.
  static absl::StatusOr<std::unique_ptr<ExpertClient>> Connect(
      const std::string& address, absl::Duration connect_timeout = absl::Seconds(5),
      OnBreak on_break = nullptr);
  ~ExpertClient() override;

  void Send(v1::ExpertBatch batch, Done done) override;
  const std::string& address() const override { return address_; }
  bool broken() const override;
  absl::string_view transport() const override { return "grpc"; }

 private:
  ExpertClient() = default;
  void ReadLoop();
  void WriteLoop();
  // Marks the stream broken with `status` (if it was not) and fails every waiting batch.
  void Break(const absl::Status& status);

  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertCompute::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::ExpertBatch, v1::ExpertResult>> stream_;
  std::thread reader_, writer_;
  mutable std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<v1::ExpertBatch> queue_;  // to write, in order
  std::map<uint64_t, Done> waiting_;   // by batch id
  absl::Status broken_;
  bool closing_ = false;
  OnBreak on_break_;
};

}  // namespace splitmoe::expert_plane

#endif  // SPLITMOE_COMMON_EXPERT_PLANE_EXPERT_CLIENT_H_
