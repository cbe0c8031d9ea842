// RemoteMoeExecutor: the routed-expert part of every MoE layer, computed by the cluster. An
// attention worker (prefill or decode) plugs it into its Transformer instead of the local
// experts: each RoutedExperts() call sends the whole batch's hidden states and gate scores for
// one layer to the router in one message over a long-lived MoeDispatch stream and waits for the
// combined, gate-weighted sum. One stream per executor; a reader thread matches replies to calls
// by batch id, so calls from several threads may be in flight at once. A broken stream fails
// every waiting and later call with Unavailable (never hangs: calls also have a deadline).
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto moe, RemoteMoeExecutor::Connect(router, config,
//   v1::WIRE_DTYPE_FP32)); engine::Transformer model(config, attention_weights, moe.get());
#ifndef SPLITMOE_COMMON_RPC_REMOTE_MOE_H_
#define SPLITMOE_COMMON_RPC_REMOTE_MOE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/engine/transformer.h"
#include "common/model/config.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::rpc {

class RemoteMoeExecutor : public engine::MoeExecutor {
 public:
  static absl::StatusOr<std::unique_ptr<RemoteMoeExecutor>> Connect(
      const std::string& router_address, const model::ModelConfig& config, v1::WireDtype dtype,
      absl::Duration call_timeout = absl::Seconds(60));
  ~RemoteMoeExecutor() override;

  absl::Status RoutedExperts(int64_t layer, const float* x, const float* scores, int64_t rows,
                             float* out) override;

  uint64_t bytes_sent() const { return bytes_sent_.load(); }
  uint64_t bytes_received() const { return bytes_received_.load(); }

 private:
  RemoteMoeExecutor() = default;
  void ReadLoop();
  void FailAll(const absl::Status& status);

  model::ModelConfig config_;
  v1::WireDtype dtype_ = v1::WIRE_DTYPE_FP32;
  absl::Duration call_timeout_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::MoeDispatch::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::MoeBatch, v1::MoeResult>> stream_;
  std::thread reader_;

  std::mutex mu_;  // guards everything below and serialises stream writes
  std::condition_variable cv_;
  uint64_t next_batch_id_ = 1;
  std::map<uint64_t, std::optional<v1::MoeResult>> waiting_;
  absl::Status broken_;  // OK while the stream works
  std::atomic<uint64_t> bytes_sent_{0}, bytes_received_{0};
};

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_REMOTE_MOE_H_
