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
#include "absl/time/time.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::expert_plane {

class ExpertClient {
 public:
  using Done = std::function<void(absl::StatusOr<v1::ExpertResult>)>;
  // Unavailable when the replica cannot be reached within `connect_timeout`.
  static absl::StatusOr<std::unique_ptr<ExpertClient>> Connect(
      const std::string& address, absl::Duration connect_timeout = absl::Seconds(5));
  ~ExpertClient();

  void Send(v1::ExpertBatch batch, Done done);
  const std::string& address() const { return address_; }
  bool broken() const;

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
};

}  // namespace splitmoe::expert_plane

#endif  // SPLITMOE_COMMON_EXPERT_PLANE_EXPERT_CLIENT_H_
