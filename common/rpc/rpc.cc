#include "common/rpc/rpc.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <mutex>

#include <unistd.h>

#include <cstring>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_format.h"
#include "common/base/file.h"
#include "common/base/mix64.h"
#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/model/config.h"
#include "common/model/numeric.h"
#include "common/rpc/security.h"
#include "common/model/safetensors.h"
#include "common/tokenizer/tokenizer.h"

namespace splitmoe::rpc {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::string EncodeTensor(absl::Span<const float> values, v1::WireDtype dtype) {
  std::string out;
  if (dtype == v1::WIRE_DTYPE_BF16) {
    out.resize(values.size() * 2);
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t b = model::FloatToBf16(values[i]);
      std::memcpy(&out[2 * i], &b, 2);
    }
  } else {
    out.resize(values.size() * 4);
    std::memcpy(out.data(), values.data(), out.size());
  }
  return out;
}

absl::Status DecodeTensor(const std::string& bytes, v1::WireDtype dtype, int64_t count,
                          std::vector<float>* out) {
  const size_t width = dtype == v1::WIRE_DTYPE_BF16 ? 2 : 4;
  if (count < 0 || bytes.size() != static_cast<size_t>(count) * width) {
    return absl::InvalidArgumentError(absl::StrCat("tensor of ", count, " values needs ",
                                                   count * static_cast<int64_t>(width),
                                                   " bytes, got ", bytes.size()));
  }
  out->resize(static_cast<size_t>(count));
  model::ConvertToFloat(dtype == v1::WIRE_DTYPE_BF16 ? model::DType::kBF16 : model::DType::kF32,
                        reinterpret_cast<const uint8_t*>(bytes.data()), count, out->data());
  return absl::OkStatus();
}

absl::StatusOr<RunningServer> StartServer(const std::string& address,
                                          const std::vector<grpc::Service*>& services,
                                          int max_message_bytes,
                                          std::shared_ptr<grpc::ServerCredentials> credentials,
                                          int max_streams_per_connection) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address,
                           credentials != nullptr ? credentials : InternalServerCredentials(),
                           &port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (max_streams_per_connection > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, max_streams_per_connection);
  }
  builder.SetMaxReceiveMessageSize(max_message_bytes);
  builder.SetMaxSendMessageSize(max_message_bytes);
  for (grpc::Service* s : services) builder.RegisterService(s);
  RunningServer running;
  running.server = builder.BuildAndStart();
  if (running.server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  const std::string host = address.substr(0, address.rfind(':'));
  running.address = absl::StrCat(host, ":", port);
  return running;
}

v1::TokenLogprob ToProto(const engine::TokenLogprob& lp) {
  v1::TokenLogprob out;
  out.set_token(lp.token);
  out.set_logprob(lp.logprob);
  for (const auto& [id, value] : lp.top) {
    auto* alt = out.add_top();
    alt->set_token(id);
    alt->set_logprob(value);
  }
  return out;
}

namespace {

// Two independent 64-bit lanes (xor-then-mix and multiply-add-then-mix, different seeds) over
// length-prefixed items, so that neither a shifted boundary nor one lane's collision goes
// unnoticed. Not cryptographic: it tells models apart, it does not authenticate them.
class FingerprintHasher {
 public:
  void AddU64(uint64_t v) {
    a_ = Mix64(a_ ^ v) + 0x9e3779b97f4a7c15ull;
    b_ = Mix64(b_ + v * 0xff51afd7ed558ccdull) ^ 0xc4ceb9fe1a85ec53ull;
  }
  void Add(absl::string_view bytes) {
    AddU64(bytes.size());
    size_t i = 0;
    for (; i + 8 <= bytes.size(); i += 8) {
      uint64_t word;
      std::memcpy(&word, bytes.data() + i, 8);
      AddU64(word);
    }
    if (i < bytes.size()) {
      uint64_t word = 0;
      std::memcpy(&word, bytes.data() + i, bytes.size() - i);
      AddU64(word);
    }
  }
  std::string Hex() const { return absl::StrFormat("%016x%016x", Mix64(a_), Mix64(b_ ^ a_)); }

 private:
  uint64_t a_ = 0x243f6a8885a308d3ull;
  uint64_t b_ = 0x13198a2e03707344ull;
};

}  // namespace

absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir) {
  FingerprintHasher h;
  SPLITMOE_ASSIGN_OR_RETURN(
      std::string config, ReadRegularFile(model_dir + "/config.json", model::kMaxConfigJsonBytes));
  h.Add("config.json");
  h.Add(config);
  // Optional files: whether each is there counts, and so do its bytes. One that exists but is
  // not a regular file (a FIFO, a directory) is an error here, before anyone opens it.
  const std::pair<const char*, uint64_t> optional_files[] = {
      {"tokenizer.json", tokenizer::kMaxTokenizerJsonBytes},
      {"tokenizer_config.json", tokenizer::kMaxTokenizerConfigJsonBytes},
      {"model.safetensors.index.json", model::kMaxIndexJsonBytes}};
  for (const auto& [name, max_bytes] : optional_files) {
    const std::string path = absl::StrCat(model_dir, "/", name);
    SPLITMOE_ASSIGN_OR_RETURN(const bool present, RegularFileExists(path));
    h.Add(name);
    h.Add(present ? "present" : "absent");
    if (present) {
      SPLITMOE_ASSIGN_OR_RETURN(std::string bytes, ReadRegularFile(path, max_bytes));
      h.Add(bytes);
    }
  }
  // Weights: each safetensors file's size and header (names, dtypes, shapes, offsets, metadata),
  // never its data.
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<std::string> weight_files,
                            model::WeightFileNames(model_dir));
  h.AddU64(weight_files.size());
  for (const std::string& name : weight_files) {
    SPLITMOE_ASSIGN_OR_RETURN(model::SafetensorsHeader header,
                              model::ReadSafetensorsHeader(model_dir + "/" + name));
    h.Add(name);
    h.AddU64(header.file_bytes);
    h.Add(header.bytes);
  }
  return h.Hex();
}

namespace {
std::mutex advertise_mu;
std::string& AdvertiseHost() {
  static std::string* host = new std::string();
  return *host;
}
}  // namespace

void SetAdvertiseHost(const std::string& host) {
  std::lock_guard<std::mutex> lock(advertise_mu);
  // An IPv6 literal is bracketed in HOST:PORT.
  AdvertiseHost() = host.find(':') != std::string::npos && host.front() != '['
                        ? absl::StrCat("[", host, "]")
                        : host;
}

std::string AdvertisedAddress(const std::string& bound) {
  const size_t colon = bound.rfind(':');
  if (colon == std::string::npos) return bound;
  {
    std::lock_guard<std::mutex> lock(advertise_mu);
    if (!AdvertiseHost().empty()) return absl::StrCat(AdvertiseHost(), bound.substr(colon));
  }
  const std::string host = bound.substr(0, colon);
  if (host != "0.0.0.0" && host != "[::]" && host != "::" && host != "[::0]") return bound;
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return bound;
  return absl::StrCat(name, bound.substr(colon));
}

std::vector<std::string> RouterAddresses(const std::string& flag) {
  std::vector<std::string> out;
  for (absl::string_view a : absl::StrSplit(flag, ',', absl::SkipWhitespace())) {
    out.emplace_back(absl::StripAsciiWhitespace(a));
  }
  return out;
}

grpc::ChannelArguments ClientChannelArguments(int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  // A peer that went away (a restarted router, a replaced replica) is tried again within a
  // second, not after gRPC's default back-off of up to two minutes. gRPC takes the "minimum
  // back-off" as the least time a connection attempt (TCP and HTTP/2 handshake) may take: at
  // 100 ms, attempts on a busy machine were cut short again and again ("tcp handshaker
  // shutdown") and a restarted router stayed unreachable from an old channel for ~8 s.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return args;
}

}  // namespace splitmoe::rpc
