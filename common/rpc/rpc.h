// Helpers at the process boundary: absl::Status <-> grpc::Status (the one conversion at the
// edge), tensors in protobuf `bytes` fields (fp32 exact or bf16), and starting a gRPC server
// with the standard health service and server reflection on an address whose port may be 0.
// Stateless functions; any thread.
//
//   std::string bytes = EncodeTensor(hidden, v1::WIRE_DTYPE_BF16);
//   SPLITMOE_RETURN_IF_ERROR(DecodeTensor(bytes, v1::WIRE_DTYPE_BF16, tokens * hidden_size, &out));
//   SPLITMOE_ASSIGN_OR_RETURN(RunningServer server, StartServer("127.0.0.1:0", {&service}));
//   std::cout << "listening " << server.address << "\n";
#ifndef SPLITMOE_COMMON_RPC_RPC_H_
#define SPLITMOE_COMMON_RPC_RPC_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/engine/sampler.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::rpc {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

std::string EncodeTensor(absl::Span<const float> values, v1::WireDtype dtype);
// Decodes exactly `count` values; a byte count that does not match is InvalidArgument.
absl::Status DecodeTensor(const std::string& bytes, v1::WireDtype dtype, int64_t count,
                          std::vector<float>* out);

struct RunningServer {
  std::unique_ptr<grpc::Server> server;
  std::string address;  // host:port actually bound
};

// Binds `address` ("host:port", port 0 picks a free one) with every service in `services`, the
// grpc.health.v1 service (all services SERVING) and server reflection. Messages up to
// `max_message_bytes` are accepted (gRPC's default of 4 MiB is too small for MoE batches).
// `credentials` null: the internal plane's (security.h InternalServerCredentials). A port
// another process holds is refused (no SO_REUSEPORT: two routers never split one port).
// `max_streams_per_connection` > 0 caps a client connection's concurrent calls (HTTP/2
// SETTINGS_MAX_CONCURRENT_STREAMS: the client queues the rest).
absl::StatusOr<RunningServer> StartServer(
    const std::string& address, const std::vector<grpc::Service*>& services,
    int max_message_bytes = 256 << 20,
    std::shared_ptr<grpc::ServerCredentials> credentials = nullptr,
    int max_streams_per_connection = 0);

// A token's logprob and its alternatives as the API carries them.
v1::TokenLogprob ToProto(const engine::TokenLogprob& logprob);

// A 128-bit hash (32 hex digits, two independent 64-bit lanes; not cryptographic) of what makes
// a model directory the same model: config.json, tokenizer.json and tokenizer_config.json (and
// whether each is there), model.safetensors.index.json, and every safetensors file's name, size
// and header (the index's shards, else every *.safetensors in the directory, sorted by name).
// Cheap: weight data is never read. Workers register with it and the router refuses a worker of
// another model, also one with the same config.json but other weights. Every file must be a
// regular file (a FIFO or directory is an error, never waited on).
absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir);

// The address a worker registers (and its metrics URL): `bound` with the host given to
// SetAdvertiseHost (the process's --advertise-host, e.g. a pod IP or DNS name) when one was;
// else `bound` as is, except that a wildcard host (0.0.0.0, [::]) becomes this machine's host
// name, which other machines can resolve.
std::string AdvertisedAddress(const std::string& bound);
void SetAdvertiseHost(const std::string& host);

// The routers of a `--router` flag: one address, or several separated by commas ("A,B"), in
// the order given (the first is preferred). Blank entries are dropped.
std::vector<std::string> RouterAddresses(const std::string& flag);

// Channel arguments every splitmoe client uses (message size, keepalive).
grpc::ChannelArguments ClientChannelArguments(int max_message_bytes = 256 << 20);

}  // namespace splitmoe::rpc

#endif  // SPLITMOE_COMMON_RPC_RPC_H_
