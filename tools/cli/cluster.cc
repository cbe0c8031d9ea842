#include "tools/cli/cluster.h"
#include "tools/cli/generate_common.h"

#include <unistd.h>

#include <signal.h>

#include <cstdlib>

#include <iostream>
#include <mutex>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/base/log.h"
#include "common/base/status_macros.h"
#include "common/process/signals.h"
#include "common/process/subprocess.h"
#include "common/expert_plane/direct_moe.h"
#include "common/kernels/ops.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "decode/run_decode.h"
#include "nlohmann/json.hpp"
#include "prefill/run_prefill.h"
#include "splitmoe/v1/generation.grpc.pb.h"
#include "splitmoe/v1/internal.grpc.pb.h"

namespace splitmoe::cli {
namespace {

using nlohmann::json;

// Measured on the project's 2-core VMs (docs/performance.md): see BusyPollFlag.
constexpr int64_t kDefaultBusyPollUs = 0;

absl::StatusOr<v1::WireDtype> WireFlag(const Flags& f) {
  const std::string wire = f.Get("wire-dtype", "fp32");
  if (wire == "fp32") return v1::WIRE_DTYPE_FP32;
  if (wire == "bf16") return v1::WIRE_DTYPE_BF16;
  return absl::InvalidArgumentError("--wire-dtype must be fp32 or bf16");
}

// The expert data plane of an attention worker: --wire-dtype, --moe-transport,
// --expert-deadline-ms (a replica's part of a batch, plus 2 ms per token, before failover).
absl::StatusOr<expert_plane::DirectMoeOptions> MoeFlags(const Flags& f) {
  expert_plane::DirectMoeOptions o;
  SPLITMOE_ASSIGN_OR_RETURN(o.dtype, WireFlag(f));
  const std::string transport = f.Get("moe-transport", "ucx");
  if (transport != "ucx" && transport != "grpc") {
    return absl::InvalidArgumentError("--moe-transport must be ucx or grpc");
  }
  o.transport = transport == "ucx" ? expert_plane::MoeTransport::kUcx
                                   : expert_plane::MoeTransport::kGrpc;
  SPLITMOE_ASSIGN_OR_RETURN(o.busy_poll, BusyPollFlag(f));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t deadline, f.GetInt("expert-deadline-ms", 500));
  if (deadline <= 0) return absl::InvalidArgumentError("--expert-deadline-ms must be > 0");
  o.deadline = absl::Milliseconds(deadline);
  return o;
}

// --micro-batches: 2 runs a batch as two micro-batches in ping-pong (one's attention while the
// other's experts compute), 1 (the default) as one: on machines where the experts share the
// attention worker's cores, or where the experts' compute dominates, splitting costs more than
// the overlap hides (docs/performance.md).
absl::StatusOr<int> MicroBatchesFlag(const Flags& f) {
  SPLITMOE_ASSIGN_OR_RETURN(int64_t n, f.GetInt("micro-batches", 1));
  if (n != 1 && n != 2) return absl::InvalidArgumentError("--micro-batches must be 1 or 2");
  return static_cast<int>(n);
}

json LogprobJson(const v1::TokenLogprob& lp, bool with_top) {
  json top = json::array();
  if (with_top) {
    for (const auto& alt : lp.top()) top.push_back({alt.token(), alt.logprob()});
  }
  return {{"token", lp.token()}, {"logprob", lp.logprob()}, {"top_logprobs", top}};
}

// The public door of `endpoint`, with the API key of --api-key or $SPLITMOE_API_KEY when there
// is one.
std::unique_ptr<v1::Generation::Stub> GenerationStub(const Flags& f, const std::string& endpoint) {
  return v1::Generation::NewStub(
      rpc::PublicChannel(endpoint, rpc::ClientApiKey(f.Get("api-key"))));
}

// The prompt's ids: --prompt-tokens, or --prompt tokenised by the cluster (BOS as configured).
absl::StatusOr<std::vector<int32_t>> RemotePrompt(const Flags& f, v1::Generation::Stub& stub) {
  if (f.Has("prompt-tokens") == f.Has("prompt")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT and --prompt-tokens IDS");
  }
  if (f.Has("prompt-tokens")) return f.GetIntList("prompt-tokens");
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::TokenizeRequest request;
  request.set_text(f.Get("prompt"));
  request.set_add_special_tokens(true);
  v1::TokenizeResponse response;
  SPLITMOE_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub.Tokenize(&ctx, request, &response)));
  return std::vector<int32_t>(response.ids().begin(), response.ids().end());
}

}  // namespace

absl::StatusOr<absl::Duration> BusyPollFlag(const Flags& f) {
  SPLITMOE_ASSIGN_OR_RETURN(int64_t us, f.GetInt("busy-poll-us", kDefaultBusyPollUs));
  if (us < 0 || us > 1000000) {
    return absl::InvalidArgumentError("--busy-poll-us must be in [0, 1000000]");
  }
  return absl::Microseconds(us);
}

absl::StatusOr<bool> Bf16PrecisionFlag(const Flags& f) {
  const std::string precision = f.Get("precision", "fp32");
  if (precision != "fp32" && precision != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--precision must be fp32 or bf16, got '", precision, "'"));
  }
  return precision == "bf16";
}

// `--device D[,D...]` (or another flag of that form) of `up`: each device parsed, so a typo is
// refused before any process starts; `up` hands them out round robin.
absl::StatusOr<std::vector<std::string>> DeviceList(const std::string& flag,
                                                    const std::string& value, bool* any_gpu) {
  std::vector<std::string> devices = absl::StrSplit(value, ',');
  for (const std::string& d : devices) {
    absl::StatusOr<kernels::Device> parsed = kernels::ParseDevice(d);
    if (!parsed.ok()) return Annotate(parsed.status(), absl::StrCat("--", flag));
    *any_gpu = *any_gpu || parsed->backend == kernels::Backend::kCuda;
  }
  return devices;
}

absl::Status PrefillCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(
      f.Parse(argc, argv, 2,
              {"model", "listen", "router", "metrics-listen", "wire-dtype", "attention", "batch-tokens",
               "moe-transport", "expert-deadline-ms", "micro-batches", "busy-poll-us", "weights",
               "device", "precision", "device-cache-tokens"},
              {"no-mtp"}));
  if (!f.Has("model") || !f.Has("router")) {
    return absl::InvalidArgumentError("prefill needs --model DIR and --router HOST:PORT");
  }
  prefill::PrefillOptions o;
  o.device = f.Get("device", "cpu");
  SPLITMOE_RETURN_IF_ERROR(EnableDevice(o.device));
  SPLITMOE_ASSIGN_OR_RETURN(const bool bf16, Bf16PrecisionFlag(f));
  if ((f.Has("precision") || f.Has("device-cache-tokens")) && o.device == "cpu") {
    return absl::InvalidArgumentError(
        "--precision and --device-cache-tokens apply to --device cuda:N");
  }
  o.on_device.weights = bf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32;
  SPLITMOE_ASSIGN_OR_RETURN(o.on_device.cache_tokens,
                            f.GetInt("device-cache-tokens", o.on_device.cache_tokens));
  if (o.on_device.cache_tokens <= 0) {
    return absl::InvalidArgumentError("--device-cache-tokens must be > 0");
  }
  o.model_dir = f.Get("model");
  o.listen = f.Get("listen", o.listen);
  o.metrics_listen = f.Get("metrics-listen");
  o.router = f.Get("router");
  SPLITMOE_ASSIGN_OR_RETURN(o.moe, MoeFlags(f));
  SPLITMOE_ASSIGN_OR_RETURN(o.form, AttentionFormFromFlags(f));
  SPLITMOE_ASSIGN_OR_RETURN(o.batch_tokens, f.GetInt("batch-tokens", o.batch_tokens));
  if (o.batch_tokens <= 0) return absl::InvalidArgumentError("--batch-tokens must be > 0");
  SPLITMOE_ASSIGN_OR_RETURN(o.micro_batches, MicroBatchesFlag(f));
  SPLITMOE_ASSIGN_OR_RETURN(o.weights, model::ParseResidentDType(f.Get("weights", "checkpoint")));
  o.load_mtp = !f.Has("no-mtp");
  return prefill::RunPrefillWorker(o);
}

absl::Status DecodeCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(argc, argv, 2,
                                   {"model", "listen", "router", "metrics-listen", "cache-blocks", "block-tokens",
                                    "cache-dtype", "wire-dtype", "reclaim-grace-ms",
                                    "moe-transport", "expert-deadline-ms", "micro-batches",
                                    "busy-poll-us", "weights", "speculative", "draft-tokens",
                                    "reserve-margin-tokens", "device", "precision"},
                                   {"reserve-upfront", "no-prefix-cache"}));
  if (!f.Has("model") || !f.Has("router")) {
    return absl::InvalidArgumentError("decode needs --model DIR and --router HOST:PORT");
  }
  decode::DecodeOptions o;
  o.device = f.Get("device", "cpu");
  SPLITMOE_RETURN_IF_ERROR(EnableDevice(o.device));
  SPLITMOE_ASSIGN_OR_RETURN(const bool bf16, Bf16PrecisionFlag(f));
  if (f.Has("precision") && o.device == "cpu") {
    return absl::InvalidArgumentError("--precision applies to --device cuda:N");
  }
  o.device_weights = bf16 ? model::WeightDType::kBFloat16 : model::WeightDType::kFloat32;
  o.model_dir = f.Get("model");
  o.listen = f.Get("listen", o.listen);
  o.metrics_listen = f.Get("metrics-listen");
  o.router = f.Get("router");
  SPLITMOE_ASSIGN_OR_RETURN(o.cache_blocks, f.GetInt("cache-blocks", o.cache_blocks));
  SPLITMOE_ASSIGN_OR_RETURN(o.block_tokens, f.GetInt("block-tokens", o.block_tokens));
  const std::string dtype = f.Get("cache-dtype", "fp32");
  if (dtype != "fp32" && dtype != "bf16") {
    return absl::InvalidArgumentError("--cache-dtype must be fp32 or bf16");
  }
  o.cache_dtype = dtype == "fp32" ? decode::LatentDType::kFloat32 : decode::LatentDType::kBFloat16;
  SPLITMOE_ASSIGN_OR_RETURN(o.moe, MoeFlags(f));
  SPLITMOE_ASSIGN_OR_RETURN(o.weights, model::ParseResidentDType(f.Get("weights", "checkpoint")));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t grace, f.GetInt("reclaim-grace-ms", 5000));
  if (grace < 0) return absl::InvalidArgumentError("--reclaim-grace-ms must be >= 0");
  o.reclaim_grace = absl::Milliseconds(grace);
  SPLITMOE_ASSIGN_OR_RETURN(o.micro_batches, MicroBatchesFlag(f));
  SPLITMOE_ASSIGN_OR_RETURN(o.draft_tokens, DraftTokensFromFlags(f));
  o.reserve_upfront = f.Has("reserve-upfront");
  o.prefix_cache = !f.Has("no-prefix-cache");
  SPLITMOE_ASSIGN_OR_RETURN(o.reserve_margin_tokens, f.GetInt("reserve-margin-tokens", 0));
  if (o.reserve_margin_tokens < 0) {
    return absl::InvalidArgumentError("--reserve-margin-tokens must be >= 0");
  }
  return decode::RunDecode(o);
}

// `up`'s Launcher service: Scale calls are queued for up's own loop, which alone owns the
// children; the loop answers them (the handler never waits).
class LauncherService final : public v1::Launcher::CallbackService {
 public:
  struct Call {
    v1::ScaleRequest request;
    v1::ScaleResponse* response;
    grpc::ServerUnaryReactor* reactor;
  };
  grpc::ServerUnaryReactor* Scale(grpc::CallbackServerContext* ctx, const v1::ScaleRequest* request,
                                  v1::ScaleResponse* response) override {
    if (grpc::ServerUnaryReactor* refused = rpc::RefuseInternal(ctx)) return refused;
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the cluster is stopping"));
    } else {
      calls_.push_back({*request, response, reactor});
    }
    return reactor;
  }
  // From now on Scale is refused at once.
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  std::vector<Call> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Call> out;
    out.swap(calls_);
    return out;
  }

 private:
  std::mutex mu_;
  std::vector<Call> calls_;
  bool closed_ = false;
};

absl::Status UpCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(f.Parse(
      argc, argv, 2,
      {"model", "prefill", "decode", "experts", "expert-replicas", "port", "host", "cache-blocks",
       "block-tokens", "cache-dtype", "wire-dtype", "heartbeat-ms", "max-devices",
       "prefill-batch-tokens", "bias-update-rate", "bias-bound", "moe-transport",
       "expert-deadline-ms", "micro-batches", "busy-poll-us", "api-keys", "routers", "weights",
       "http-port", "served-model-name", "speculative", "draft-tokens", "reserve-margin-tokens",
       "device", "expert-device", "precision"},
      {"tls", "reserve-upfront", "no-prefix-cache"}));
  if (!f.Has("model")) return absl::InvalidArgumentError("up needs --model DIR");
  // --device D[,D...]: the attention workers' devices (decode workers first, then prefill
  // workers, the k-th one started on the k-th device, round robin), and the expert services'
  // unless --expert-device D[,D...] names theirs (round robin too); --precision for every
  // process on a GPU.
  bool any_gpu = false;
  SPLITMOE_ASSIGN_OR_RETURN(const std::vector<std::string> attention_devices,
                            DeviceList("device", f.Get("device", "cpu"), &any_gpu));
  SPLITMOE_ASSIGN_OR_RETURN(
      const std::vector<std::string> expert_devices,
      DeviceList("expert-device", f.Get("expert-device", f.Get("device", "cpu")), &any_gpu));
  SPLITMOE_RETURN_IF_ERROR(Bf16PrecisionFlag(f).status());
  if (f.Has("precision") && !any_gpu) {
    return absl::InvalidArgumentError(
        "up: --precision applies to --device or --expert-device cuda:N");
  }
  int64_t experts_started = 0, attention_started = 0;
  // A process's --device (and --precision, on a GPU).
  auto place = [&](std::vector<std::string>& args, const std::vector<std::string>& devices,
                   int64_t& started) {
    const std::string& device = devices[static_cast<size_t>(started++) % devices.size()];
    args.push_back("--device");
    args.push_back(device);
    if (f.Has("precision") && device != "cpu") {
      args.push_back("--precision");
      args.push_back(f.Get("precision"));
    }
  };
  SPLITMOE_RETURN_IF_ERROR(DraftTokensFromFlags(f).status());
  // Every child shares this host's cores: an OpenMP pool that spins while its process waits
  // for another (a decode step for its experts) takes the cores that process needs. Measured
  // here (docs/capacity.md): with spinning pools a one-client cluster decodes 4x slower. The
  // children's pools sleep instead, unless the caller chose a policy.
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", /*overwrite=*/0);
  if (f.Has("weights")) {
    SPLITMOE_RETURN_IF_ERROR(model::ParseResidentDType(f.Get("weights")).status());
  }
  // A closed internal plane: mutual TLS with a throwaway CA and a certificate per role
  // (--tls), or the cluster token every child is given (--cluster-token-file, taken by main).
  // Either way, and with --api-keys, the router serves its internal services on their own port.
  const rpc::SecurityOptions given = rpc::ConfiguredSecurity();
  if (!given.tls_cert.empty()) {
    return absl::InvalidArgumentError(
        "up makes its own certificates: use --tls (--tls-cert/--tls-key/--tls-ca are for "
        "processes started by hand)");
  }
  std::string tls_dir;
  if (f.Has("tls")) {
    if (!given.cluster_token_file.empty()) {
      return absl::InvalidArgumentError("--tls and --cluster-token-file: give one or the other");
    }
    char tmpl[] = "/tmp/splitmoe-tls-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("cannot make a certificate folder");
    tls_dir = tmpl;
    SPLITMOE_RETURN_IF_ERROR(rpc::MakeLocalCertificates(
        tls_dir, {"router", "prefill", "decode", "expert", "admin"}));
    SPLITMOE_RETURN_IF_ERROR(rpc::ConfigureInternalSecurity({.tls_cert = tls_dir + "/admin.crt",
                                                             .tls_key = tls_dir + "/admin.key",
                                                             .tls_ca = tls_dir + "/ca.crt",
                                                             .role = "admin"}));
    std::cout << "certificates " << tls_dir << " (admin.crt/admin.key for scale and rebalance)"
              << std::endl;
  }
  const bool closed = !tls_dir.empty() || !given.cluster_token_file.empty() || f.Has("api-keys");
  // The internal plane's flags for a child of `role`.
  auto security = [&](std::vector<std::string>& argv, const std::string& role) {
    if (!tls_dir.empty()) {
      for (const std::string& a : {std::string("--tls-cert"), tls_dir + "/" + role + ".crt",
                                   std::string("--tls-key"), tls_dir + "/" + role + ".key",
                                   std::string("--tls-ca"), tls_dir + "/ca.crt"}) {
        argv.push_back(a);
      }
    } else if (!given.cluster_token_file.empty()) {
      argv.push_back("--cluster-token-file");
      argv.push_back(given.cluster_token_file);
    }
  };
  const std::string model = f.Get("model");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t n_prefill, f.GetInt("prefill", 1));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t n_decode, f.GetInt("decode", 1));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t n_experts, f.GetInt("experts", 1));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t replicas, f.GetInt("expert-replicas", 1));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t port, f.GetInt("port", 0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t n_routers, f.GetInt("routers", 1));
  // The OpenAI-compatible HTTP front door: router i on --http-port + i (0: any free port).
  SPLITMOE_ASSIGN_OR_RETURN(int64_t http_port, f.GetInt("http-port", -1));
  if (f.Has("http-port") && (http_port < 0 || http_port + n_routers - 1 > 65535)) {
    return absl::InvalidArgumentError(
        "--http-port must be in [0, 65535] (with --routers N they listen on P, P+1, ...)");
  }
  if (n_prefill < 1 || n_decode < 1 || n_experts < 1 || replicas < 1 || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        "--prefill, --decode, --experts and --expert-replicas must be >= 1 and --port in "
        "[0, 65535]");
  }
  if (n_routers < 1 || n_routers > 8 || (port > 0 && port + n_routers - 1 > 65535)) {
    return absl::InvalidArgumentError(
        "--routers must be in [1, 8] (with --port P they listen on P, P+1, ...)");
  }
  SPLITMOE_RETURN_IF_ERROR(MoeFlags(f).status());  // refuse bad worker flags before starting
  SPLITMOE_RETURN_IF_ERROR(MicroBatchesFlag(f).status());
  const std::string host = f.Get("host", "127.0.0.1");
  char self[4096];
  const ssize_t len = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (len <= 0) return absl::InternalError("cannot find this executable (/proc/self/exe)");
  const std::string bin(self, static_cast<size_t>(len));
  auto pass = [&f](std::vector<std::string>& argv, const std::string& flag) {
    if (f.Has(flag)) {
      argv.push_back("--" + flag);
      argv.push_back(f.Get(flag));
    }
  };

  // Children in start order; stopped in reverse (workers before the router). A child that dies
  // is started again with the same arguments after a back-off (1 s, doubling to 30 s) while the
  // rest keep serving.
  struct Child {
    std::string name;
    std::vector<std::string> args;
    std::unique_ptr<process::Subprocess> process;
    absl::Duration backoff = absl::Seconds(1);
    absl::Time restart_at = absl::InfiniteFuture();
    absl::Time started_at = absl::Now();
    int64_t shard = -1;  // expert replicas: their shard
  };
  std::vector<Child> children;
  auto stop_all = [&children] {
    for (auto it = children.rbegin(); it != children.rend(); ++it) {
      if (it->process != nullptr && !it->process->Poll()) it->process->Terminate(absl::Seconds(5));
    }
  };
  auto launch = [&](Child& child) -> absl::StatusOr<std::string> {
    std::vector<std::string> args = child.args;
    args.insert(args.begin(), bin);
    child.started_at = absl::Now();
    SPLITMOE_ASSIGN_OR_RETURN(child.process, process::Subprocess::Start(child.name, args));
    absl::StatusOr<std::string> line =
        child.process->ReadLineMatching("listening ", absl::Seconds(120));
    if (!line.ok()) {
      return absl::Status(line.status().code(),
                          absl::StrCat(child.name, " did not start: ", line.status().message()));
    }
    return *line;
  };
  auto start = [&](const std::string& name,
                   std::vector<std::string> args) -> absl::StatusOr<std::string> {
    Child child;
    child.name = name;
    child.args = std::move(args);
    children.push_back(std::move(child));
    return launch(children.back());
  };
  auto fail = [&](const absl::Status& s) {
    stop_all();
    return s;
  };

  // The Launcher (`splitmoe scale`) listens before the router starts, so the router can name it.
  LauncherService launcher;
  SPLITMOE_ASSIGN_OR_RETURN(rpc::RunningServer launcher_server,
                            rpc::StartServer(host + ":0", {&launcher}));
  // Routers: every worker registers with each (`--router A,B,...`), so losing one loses only
  // the requests in flight through it. Router i listens on --port + i (or any free port).
  std::vector<std::string> publics, internals, https;
  for (int64_t i = 0; i < n_routers; ++i) {
    std::vector<std::string> router_args = {
        "router", "--model", model, "--listen",
        absl::StrCat(host, ":", port > 0 ? port + i : 0), "--launcher", launcher_server.address};
    for (const char* flag : {"heartbeat-ms", "max-devices", "bias-update-rate", "bias-bound",
                             "api-keys", "served-model-name"})
      pass(router_args, flag);
    router_args.push_back("--metrics-listen");
    router_args.push_back(host + ":0");
    if (http_port >= 0) {
      router_args.push_back("--http-listen");
      router_args.push_back(absl::StrCat(host, ":", http_port > 0 ? http_port + i : 0));
    }
    security(router_args, "router");
    if (closed) {
      router_args.push_back("--internal-listen");
      router_args.push_back(host + ":0");
    }
    absl::StatusOr<std::string> public_address =
        start(n_routers == 1 ? "router" : absl::StrCat("router", i), router_args);
    if (!public_address.ok()) return fail(public_address.status());
    // Workers and this launcher reach the router's internal port (the same as the public one
    // in an open cluster).
    absl::StatusOr<std::string> internal =
        children.back().process->ReadLineMatching("internal ", absl::Seconds(30));
    if (!internal.ok()) return fail(internal.status());
    // A restarted router binds the same addresses, so the workers find it again.
    children.back().args[4] = *public_address;
    if (closed) children.back().args.back() = *internal;
    if (http_port >= 0) {
      absl::StatusOr<std::string> http =
          children.back().process->ReadLineMatching("http ", absl::Seconds(30));
      if (!http.ok()) return fail(http.status());
      std::vector<std::string>& args = children.back().args;
      for (size_t k = 0; k + 1 < args.size(); ++k) {
        if (args[k] == "--http-listen") args[k + 1] = *http;
      }
      https.push_back(absl::StrCat("http://", *http));
    }
    publics.push_back(*public_address);
    internals.push_back(*internal);
  }
  const std::string routers = absl::StrJoin(internals, ",");
  std::vector<int64_t> next_replica(static_cast<size_t>(n_experts), 0);
  auto start_expert = [&](int64_t s) {
    const int64_t r = next_replica[static_cast<size_t>(s)]++;
    std::vector<std::string> args = {"expert", "--model", model, "--router", routers,
                                     "--listen", host + ":0", "--shard", std::to_string(s),
                                     "--num-shards", std::to_string(n_experts),
                                     "--metrics-listen", host + ":0"};
    pass(args, "moe-transport");
    pass(args, "busy-poll-us");
    pass(args, "weights");
    place(args, expert_devices, experts_started);
    security(args, "expert");
    absl::StatusOr<std::string> started = start(absl::StrCat("expert", s, ".", r), args);
    children.back().shard = s;
    return started;
  };
  for (int64_t s = 0; s < n_experts; ++s) {
    for (int64_t r = 0; r < replicas; ++r) {
      absl::StatusOr<std::string> started = start_expert(s);
      if (!started.ok()) return fail(started.status());
    }
  }
  for (int64_t i = 0; i < n_decode; ++i) {
    std::vector<std::string> args = {"decode", "--model", model, "--router", routers,
                                     "--listen", host + ":0", "--metrics-listen", host + ":0"};
    for (const char* flag : {"cache-blocks", "block-tokens", "cache-dtype", "wire-dtype",
                             "moe-transport", "expert-deadline-ms", "micro-batches",
                             "busy-poll-us", "weights", "speculative", "draft-tokens",
                             "reserve-margin-tokens"})
      pass(args, flag);
    if (f.Has("reserve-upfront")) args.push_back("--reserve-upfront");
    if (f.Has("no-prefix-cache")) args.push_back("--no-prefix-cache");
    place(args, attention_devices, attention_started);
    security(args, "decode");
    absl::StatusOr<std::string> r = start(absl::StrCat("decode", i), args);
    if (!r.ok()) return fail(r.status());
  }
  for (int64_t i = 0; i < n_prefill; ++i) {
    std::vector<std::string> args = {"prefill", "--model", model, "--router", routers,
                                     "--listen", host + ":0", "--metrics-listen", host + ":0"};
    for (const char* flag :
         {"wire-dtype", "moe-transport", "expert-deadline-ms", "micro-batches", "busy-poll-us",
          "weights"})
      pass(args, flag);
    if (f.Has("prefill-batch-tokens")) {
      args.push_back("--batch-tokens");
      args.push_back(f.Get("prefill-batch-tokens"));
    }
    // Its decode workers draft with MTP or never ask for the module's layer.
    if (f.Get("speculative") != "mtp") args.push_back("--no-mtp");
    place(args, attention_devices, attention_started);
    security(args, "prefill");
    absl::StatusOr<std::string> r = start(absl::StrCat("prefill", i), args);
    if (!r.ok()) return fail(r.status());
  }

  // Healthy = registered and heartbeating, as every router sees it.
  const int64_t want = n_experts * replicas + n_decode + n_prefill;
  for (const std::string& internal : internals) {
    auto registry = v1::Registry::NewStub(rpc::InternalChannel(internal));
    bool healthy = false;
    for (int i = 0; i < 600 && !healthy; ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      v1::ClusterStatusResponse status;
      if (registry->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &status).ok()) {
        int64_t n = 0;
        for (const auto& w : status.workers()) n += w.healthy();
        healthy = n == want;
      }
      if (!healthy) absl::SleepFor(absl::Milliseconds(100));
    }
    if (!healthy) {
      return fail(absl::DeadlineExceededError(absl::StrCat(
          "the cluster's workers did not all become healthy at router ", internal)));
    }
  }
  if (closed) std::cout << "internal grpc=" << routers << std::endl;
  std::cout << "ready grpc=" << absl::StrJoin(publics, ",");
  if (!https.empty()) std::cout << " http=" << absl::StrJoin(https, ",");
  std::cout << std::endl;

  // Grows or shrinks one shard's pool: new replicas started (they join when registered), the
  // newest surplus ones drained with SIGTERM, waited for, and not restarted.
  auto scale = [&](const v1::ScaleRequest& request,
                   v1::ScaleResponse* response) -> absl::Status {
    if (request.shard() < 0 || request.shard() >= n_experts) {
      return absl::InvalidArgumentError(absl::StrCat("scale: shard ", request.shard(),
                                                     " is not one of this cluster's ", n_experts));
    }
    if (request.replicas() < 0 || request.replicas() > 64) {
      return absl::InvalidArgumentError("scale: replicas must be in [0, 64]");
    }
    std::vector<size_t> pool;
    for (size_t i = 0; i < children.size(); ++i) {
      if (children[i].shard == request.shard()) pool.push_back(i);
    }
    response->set_replicas_before(static_cast<int32_t>(pool.size()));
    for (auto n = static_cast<int32_t>(pool.size()); n < request.replicas(); ++n) {
      absl::StatusOr<std::string> started = start_expert(request.shard());
      if (!started.ok()) return started.status();
      response->add_started(*started);
    }
    std::vector<size_t> surplus;
    for (size_t k = static_cast<size_t>(request.replicas()); k < pool.size(); ++k)
      surplus.push_back(pool[k]);
    for (size_t i : surplus) {  // drain them together
      if (children[i].process != nullptr) children[i].process->Signal(SIGTERM);
    }
    for (size_t i : surplus) {
      Child& child = children[i];
      const absl::Time end = absl::Now() + absl::Seconds(20);
      while (child.process != nullptr && !child.process->Poll() && absl::Now() < end)
        absl::SleepFor(absl::Milliseconds(20));
      if (child.process != nullptr && !child.process->Poll())
        child.process->Terminate(absl::Seconds(2));
      response->add_stopped(child.name);
      SPLITMOE_LOG(INFO, "up").With("child", child.name) << "drained (scale)";
    }
    for (auto it = surplus.rbegin(); it != surplus.rend(); ++it)
      children.erase(children.begin() + static_cast<std::ptrdiff_t>(*it));
    response->set_replicas(request.replicas());
    return absl::OkStatus();
  };

  // Serve until interrupted. A child that dies is named and restarted with back-off; the others
  // keep serving (requests that needed it fail or fail over, as their role allows).
  while (true) {
    const int signal = process::WaitForTerminationSignalFor(absl::Milliseconds(100));
    if (signal != 0) {
      SPLITMOE_LOG(INFO, "up").With("signal", signal) << "stopping the cluster";
      launcher.Close();  // every Scale call is answered, so the server's shutdown cannot wait
      for (LauncherService::Call& call : launcher.Take()) {
        call.reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the cluster is stopping"));
      }
      stop_all();
      launcher_server.server->Shutdown(std::chrono::system_clock::now());
      return absl::OkStatus();
    }
    for (LauncherService::Call& call : launcher.Take()) {
      call.reactor->Finish(rpc::ToGrpcStatus(scale(call.request, call.response)));
    }
    const absl::Time now = absl::Now();
    for (Child& child : children) {
      if (child.restart_at == absl::InfiniteFuture()) {
        if (child.process == nullptr) {  // its start failed: try again after the back-off
          child.restart_at = now + child.backoff;
          continue;
        }
        if (std::optional<std::string> exit = child.process->Poll()) {
          // A child that served for a minute starts its back-off afresh.
          if (now - child.started_at > absl::Minutes(1)) child.backoff = absl::Seconds(1);
          child.restart_at = now + child.backoff;
          SPLITMOE_LOG(WARNING, "up").With("child", child.name)
                  .With("pid", child.process->pid())
                  .With("restart_in", absl::FormatDuration(child.backoff))
              << "child " << *exit << ": restarting it";
          child.backoff = std::min(child.backoff * 2, absl::Seconds(30));
        }
      } else if (now >= child.restart_at) {
        child.restart_at = absl::InfiniteFuture();
        absl::StatusOr<std::string> line = launch(child);
        if (line.ok()) {
          SPLITMOE_LOG(INFO, "up").With("child", child.name).With("pid", child.process->pid())
                  .With("listening", *line)
              << "child restarted";
        } else {
          SPLITMOE_LOG(ERROR, "up").With("child", child.name) << line.status().message();
        }
      }
    }
  }
}

absl::Status ScaleCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(
      f.Parse(argc, argv, 2, {"endpoint", "shard", "replicas", "api-key"}, {}));
  if (!f.Has("endpoint") || !f.Has("shard") || !f.Has("replicas")) {
    return absl::InvalidArgumentError("scale needs --endpoint HOST:PORT --shard K --replicas R");
  }
  SPLITMOE_ASSIGN_OR_RETURN(int64_t shard, f.GetInt("shard", 0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t replicas, f.GetInt("replicas", 0));
  // The cluster's view through the public port; the Launcher is internal (an admin's
  // credentials where the plane is closed).
  auto registry = v1::ClusterInfo::NewStub(
      rpc::PublicChannel(f.Get("endpoint"), rpc::ClientApiKey(f.Get("api-key"))));
  auto status = [&]() -> absl::StatusOr<v1::ClusterStatusResponse> {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ClusterStatusResponse s;
    SPLITMOE_RETURN_IF_ERROR(
        rpc::FromGrpcStatus(registry->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &s)));
    return s;
  };
  SPLITMOE_ASSIGN_OR_RETURN(v1::ClusterStatusResponse before, status());
  if (before.launcher_address().empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the cluster at ", f.Get("endpoint"),
                     " was not started by `splitmoe up` (its router names no launcher): start or "
                     "stop `splitmoe expert --shard K` processes yourself"));
  }
  auto launcher = v1::Launcher::NewStub(rpc::InternalChannel(before.launcher_address()));
  v1::ScaleRequest request;
  request.set_shard(static_cast<int32_t>(shard));
  request.set_replicas(static_cast<int32_t>(replicas));
  v1::ScaleResponse response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
  const absl::Time start = absl::Now();
  SPLITMOE_RETURN_IF_ERROR(rpc::FromGrpcStatus(launcher->Scale(&ctx, request, &response)));
  // Done when the router's pool has exactly that many live replicas.
  int live = -1;
  for (int i = 0; i < 300; ++i) {
    SPLITMOE_ASSIGN_OR_RETURN(v1::ClusterStatusResponse now, status());
    live = 0;
    for (const v1::PoolStatus& pool : now.pools()) {
      if (pool.shard() != shard) continue;
      for (const v1::ReplicaStatus& r : pool.replicas()) live += r.healthy();
    }
    if (live == replicas) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  std::cout << "shard " << shard << ": " << response.replicas_before() << " -> "
            << response.replicas() << " replicas (" << response.started_size() << " started, "
            << response.stopped_size() << " drained); " << live << " live in the pool after "
            << static_cast<int64_t>(absl::ToDoubleMilliseconds(absl::Now() - start)) << " ms\n";
  if (live != replicas) {
    return absl::DeadlineExceededError(absl::StrCat("shard ", shard, " has ", live,
                                                    " live replicas, not ", replicas));
  }
  return absl::OkStatus();
}

absl::Status RebalanceCommand(int argc, char** argv) {
  Flags f;
  SPLITMOE_RETURN_IF_ERROR(
      f.Parse(argc, argv, 2, {"endpoint", "redundant-experts", "wait-s"}, {"dry-run", "json"}));
  if (!f.Has("endpoint")) return absl::InvalidArgumentError("rebalance needs --endpoint HOST:PORT");
  SPLITMOE_ASSIGN_OR_RETURN(int64_t redundant, f.GetInt("redundant-experts", 0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t wait_s, f.GetInt("wait-s", 120));
  if (redundant < 0 || redundant > (1 << 20) || wait_s < 0) {
    return absl::InvalidArgumentError(
        "--redundant-experts must be in [0, 1048576] and --wait-s >= 0");
  }
  // Internal (Registry.Rebalance): the router's internal address, with an admin's credentials
  // where the plane is closed.
  auto registry = v1::Registry::NewStub(rpc::InternalChannel(f.Get("endpoint")));
  v1::RebalanceRequest request;
  request.set_redundant_experts(static_cast<int32_t>(redundant));
  request.set_dry_run(f.Has("dry-run"));
  v1::RebalanceResponse response;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    SPLITMOE_RETURN_IF_ERROR(rpc::FromGrpcStatus(registry->Rebalance(&ctx, request, &response)));
  }
  const v1::Placement& p = response.placement();
  // Copies per shard, summed over layers (what each replica of a shard will hold).
  std::map<int32_t, int64_t> per_shard;
  for (const v1::LayerPlacement& l : p.layers()) {
    for (const v1::ExpertCopies& c : l.experts()) {
      for (int32_t s : c.shards()) ++per_shard[s];
    }
  }
  const absl::Time start = absl::Now();
  bool switched = false;
  if (!f.Has("dry-run")) {
    while (absl::Now() - start < absl::Seconds(wait_s)) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::ClusterStatusResponse status;
      if (registry->ClusterStatus(&ctx, v1::ClusterStatusRequest(), &status).ok() &&
          status.routing().placement_id() == p.id()) {
        switched = true;
        break;
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
  }
  const double switch_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  if (f.Has("json")) {
    json shards = json::object();
    for (const auto& [s, n] : per_shard) shards[std::to_string(s)] = n;
    json out = {{"placement_id", p.id()},
                {"mode", response.mode()},
                {"layers", p.layers_size()},
                {"expected_max_vio_before", response.expected_max_vio_before()},
                {"expected_max_vio_after", response.expected_max_vio_after()},
                {"expert_copies_per_shard", shards},
                {"dry_run", f.Has("dry-run")},
                {"switched", switched}};
    if (switched) out["switch_ms"] = switch_ms;
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << "placement " << p.id() << " (" << response.mode() << ", " << p.layers_size()
              << " MoE layers): expected MaxVio per shard " << response.expected_max_vio_before()
              << " -> " << response.expected_max_vio_after() << "; expert copies per shard:";
    for (const auto& [s, n] : per_shard) std::cout << " " << s << ":" << n;
    std::cout << "\n";
    if (switched) {
      std::cout << "every replica loaded it; the routing table switched after "
                << static_cast<int64_t>(switch_ms) << " ms\n";
    }
  }
  if (!f.Has("dry-run") && !switched) {
    return absl::DeadlineExceededError(absl::StrCat(
        "placement ", p.id(), " was not in force after ", wait_s,
        " s (a replica still loading it, or a shard without a live replica)"));
  }
  return absl::OkStatus();
}

namespace {

absl::Status GenerateAt(const Flags& f, const std::string& endpoint, bool* committed) {
  auto stub = GenerationStub(f, endpoint);
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, RemotePrompt(f, *stub));
  v1::GenerateRequest request;
  *request.mutable_token_ids()->mutable_ids() = {prompt.begin(), prompt.end()};
  SPLITMOE_ASSIGN_OR_RETURN(int64_t max_tokens, f.GetInt("max-tokens", 16));
  request.mutable_stop()->set_max_tokens(static_cast<int32_t>(max_tokens));
  SPLITMOE_ASSIGN_OR_RETURN(double temperature, f.GetDouble("temperature", 0.0));
  SPLITMOE_ASSIGN_OR_RETURN(double top_p, f.GetDouble("top-p", 1.0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t top_k, f.GetInt("top-k", 0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 0));
  request.mutable_sampling()->set_temperature(temperature);
  request.mutable_sampling()->set_top_p(top_p);
  request.mutable_sampling()->set_top_k(static_cast<int32_t>(top_k));
  request.mutable_sampling()->set_seed(static_cast<uint64_t>(seed));
  // The single-process --logprobs K (K >= 0: the chosen token's logprob and the top K); the API
  // counts alternatives from 1, so K = 0 asks for 1 and prints none.
  SPLITMOE_ASSIGN_OR_RETURN(int64_t logprobs, f.GetInt("logprobs", -1));
  if (logprobs >= 0) request.set_logprobs(static_cast<int32_t>(std::max<int64_t>(logprobs, 1)));
  for (const std::string& s : f.GetAll("stop")) request.mutable_stop()->add_stop(s);
  if (f.Has("stop-token-ids")) {
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, f.GetIntList("stop-token-ids"));
    *request.mutable_stop()->mutable_stop_token_ids() = {ids.begin(), ids.end()};
  }
  request.mutable_stop()->set_ignore_eos(f.Has("ignore-eos"));
  const bool as_json = f.Has("json");

  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader =
      stub->Generate(&ctx, request);
  std::vector<int32_t> tokens;
  std::string text, finish;
  json lps = json::array();
  v1::GenerateEvent event;
  while (reader->Read(&event)) {
    tokens.insert(tokens.end(), event.token_ids().begin(), event.token_ids().end());
    text += event.text();
    for (const auto& lp : event.logprobs()) lps.push_back(LogprobJson(lp, logprobs > 0));
    if (!as_json) {
      std::cout << event.text() << std::flush;
      *committed = true;  // printed: a retry elsewhere would print it again
    }
    if (event.finished()) {
      finish = event.finish_reason() == v1::FINISH_REASON_STOP ? "stop" : "length";
    }
  }
  SPLITMOE_RETURN_IF_ERROR(rpc::FromGrpcStatus(reader->Finish()));
  if (!as_json) {
    std::cout << "\n";
    return absl::OkStatus();
  }
  json out = {{"tokens", tokens}, {"text", text}, {"logprobs", lps}, {"finish_reason", finish}};
  std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  return absl::OkStatus();
}

absl::Status ScoreAt(const Flags& f, const std::string& endpoint) {
  if (f.Has("mtp")) {
    return absl::InvalidArgumentError("--mtp is not served through a cluster; use --model");
  }
  auto stub = GenerationStub(f, endpoint);
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, RemotePrompt(f, *stub));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t k, f.GetInt("top-logprobs", 5));
  if (k < 0 || k > 20) {
    return absl::InvalidArgumentError("--top-logprobs must be in [0, 20] through a cluster");
  }
  v1::GenerateRequest request;
  *request.mutable_token_ids()->mutable_ids() = {prompt.begin(), prompt.end()};
  request.mutable_stop()->set_max_tokens(1);
  request.set_prompt_logprobs(static_cast<int32_t>(std::max<int64_t>(k, 1)));
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, request);
  json lps = json::array();
  v1::GenerateEvent event;
  bool got = false;
  while (reader->Read(&event)) {
    if (got || event.prompt_logprobs_size() == 0) continue;
    got = true;
    for (const v1::PromptLogprob& p : event.prompt_logprobs()) {
      lps.push_back(p.has_logprob() ? LogprobJson(p.logprob(), k > 0) : json(nullptr));
    }
  }
  SPLITMOE_RETURN_IF_ERROR(rpc::FromGrpcStatus(reader->Finish()));
  if (!got) return absl::InternalError("the cluster returned no prompt logprobs");
  json out = {{"prompt_tokens", prompt}, {"prompt_logprobs", lps}};
  std::cout << out.dump() << "\n";
  return absl::OkStatus();
}

}  // namespace

absl::Status OnEachEndpoint(
    const Flags& f,
    const std::function<absl::Status(const std::string& endpoint, bool* committed)>& call) {
  const std::vector<std::string> endpoints = rpc::RouterAddresses(f.Get("endpoint"));
  if (endpoints.empty()) return absl::InvalidArgumentError("--endpoint needs HOST:PORT");
  absl::Status status;
  for (size_t i = 0; i < endpoints.size(); ++i) {
    bool committed = false;
    status = call(endpoints[i], &committed);
    if (status.code() != absl::StatusCode::kUnavailable || committed ||
        i + 1 == endpoints.size()) {
      return status;
    }
    SPLITMOE_LOG(WARNING, "client").With("router", endpoints[i]).With("next", endpoints[i + 1])
        << status.message();
  }
  return status;
}

absl::Status GenerateRemote(const Flags& f) {
  return OnEachEndpoint(f, [&f](const std::string& endpoint, bool* committed) {
    return GenerateAt(f, endpoint, committed);
  });
}

absl::Status ScoreRemote(const Flags& f) {
  return OnEachEndpoint(f, [&f](const std::string& endpoint, bool*) {
    return ScoreAt(f, endpoint);
  });
}

}  // namespace splitmoe::cli
