// ExpertClient: the router's long-lived ExpertCompute stream to one expert service. Send() may be
// called from any thread; each batch's `done` runs exactly once — with the result, from the
// stream's reader thread, or with Unavailable when the stream is (or becomes) broken — so a
// MoE batch waiting on a dead service fails instead of hanging.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto client, ExpertClient::Connect("127.0.0.1:7002"));
//   client->Send(std::move(batch), [](absl::StatusOr<v1::ExpertResult> r) { ... });
#ifndef SPLITMOE_ROUTER_EXPERT_CLIENT_H_
#define SPLITMOE_ROUTER_EXPERT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::router {

class ExpertClient {
 public:
  using Done = std::function<void(absl::StatusOr<v1::ExpertResult>)>;
  static absl::StatusOr<std::unique_ptr<ExpertClient>> Connect(const std::string& address);
  ~ExpertClient();

  void Send(v1::ExpertBatch batch, Done done);
  const std::string& address() const { return address_; }
  bool broken() const;

 private:
  ExpertClient() = default;
  void ReadLoop();
  void FailAll(const absl::Status& status);

  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertCompute::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::ExpertBatch, v1::ExpertResult>> stream_;
  std::thread reader_;
  mutable std::mutex mu_;             // guards below and serialises writes
  std::map<uint64_t, Done> waiting_;  // by batch id
  absl::Status broken_;
};

}  // namespace splitmoe::router

#endif  // SPLITMOE_ROUTER_EXPERT_CLIENT_H_
