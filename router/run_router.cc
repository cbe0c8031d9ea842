#include "router/run_router.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <map>
#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>

#include "common/base/log.h"
#include "nlohmann/json.hpp"

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/process/signals.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "common/runtime/actor.h"
#include "router/generation_actor.h"
#include "router/generation_service.h"
#include "router/http_front_door.h"
#include "router/readiness.h"
#include "common/metrics/metrics.h"
#include "router/registry_actor.h"
#include "router/router_services.h"

namespace splitmoe::router {

namespace {

// The model's sampling defaults for the HTTP API: generation_config.json's temperature and
// top_p when it has them (as vLLM does), else OpenAI's.
absl::StatusOr<openai::Defaults> SamplingDefaults(const std::string& model_dir,
                                                  openai::Defaults defaults) {
  std::ifstream in(model_dir + "/generation_config.json", std::ios::binary);
  if (!in) return defaults;
  std::stringstream bytes;
  bytes << in.rdbuf();
  const nlohmann::json config = nlohmann::json::parse(bytes.str(), nullptr, false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_dir, "/generation_config.json is not a JSON object"));
  }
  for (auto [key, value] : {std::pair<const char*, double*>{"temperature", &defaults.temperature},
                            {"top_p", &defaults.top_p}}) {
    auto it = config.find(key);
    if (it == config.end() || it->is_null()) continue;
    if (!it->is_number() || it->get<double>() < 0 || !std::isfinite(it->get<double>()) ||
        (std::string(key) == "top_p" && (it->get<double>() <= 0 || it->get<double>() > 1))) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, "/generation_config.json: ", key,
                                                     " is not a valid number"));
    }
    *value = it->get<double>();
  }
  return defaults;
}

// The router's scrape-time metrics: requests in flight, failovers, readiness, and the routing
// status as of the last sweep (per-expert tokens and online bias, MaxVio, MoE failovers).
std::vector<metrics::Handle> RouterMetrics(std::shared_ptr<FrontDoorGauges> gauges,
                                           std::shared_ptr<Readiness> readiness,
                                           std::shared_ptr<RoutingSnapshot> routing) {
  using metrics::Kind;
  using metrics::Sample;
  std::vector<metrics::Handle> h;
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_router_requests_in_flight", "Requests the router's front door holds now",
      Kind::kGauge, [gauges] {
        return std::vector<Sample>{{{}, double(gauges->requests_in_flight.load())}};
      }));
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_request_failovers_total",
      "Requests moved to other workers after their prefill or decode worker failed",
      Kind::kCounter, [gauges] {
        return std::vector<Sample>{{{}, double(gauges->request_failovers.load())}};
      }));
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_request_preemptions_total",
      "Requests admitted again after a decode worker preempted them (its cache was full)",
      Kind::kCounter, [gauges] {
        return std::vector<Sample>{{{}, double(gauges->request_preemptions.load())}};
      }));
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_ready", "1 when the cluster can serve (a worker of every role, every shard)",
      Kind::kGauge,
      [readiness] { return std::vector<Sample>{{{}, readiness->ready() ? 1.0 : 0.0}}; }));
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_expert_tokens_total",
      "Token-expert assignments per routed expert, all MoE layers, all attention workers",
      Kind::kCounter, [routing] {
        const v1::RoutingStatus s = routing->Get();
        std::vector<double> per_expert;
        for (const v1::MoeLayerTokens& layer : s.expert_tokens()) {
          per_expert.resize(std::max<size_t>(per_expert.size(), layer.expert_tokens_size()));
          for (int e = 0; e < layer.expert_tokens_size(); ++e)
            per_expert[static_cast<size_t>(e)] += static_cast<double>(layer.expert_tokens(e));
        }
        std::vector<Sample> out;
        for (size_t e = 0; e < per_expert.size(); ++e)
          out.push_back({{{"expert", absl::StrCat(e)}}, per_expert[e]});
        return out;
      }));
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_expert_bias",
      "The online per-expert selection bias (auxiliary-loss-free balancing), per MoE layer",
      Kind::kGauge, [routing] {
        const v1::RoutingStatus s = routing->Get();
        std::vector<Sample> out;
        if (s.bias_update_rate() <= 0) return out;  // all zero: not worth a series each
        for (const v1::LayerBias& layer : s.expert_bias()) {
          for (int e = 0; e < layer.bias_size(); ++e) {
            out.push_back({{{"layer", absl::StrCat(layer.layer())}, {"expert", absl::StrCat(e)}},
                           static_cast<double>(layer.bias(e))});
          }
        }
        return out;
      }));
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_expert_max_vio", "MaxVio of the routed experts' loads (max/mean - 1), averaged over layers",
      Kind::kGauge, [routing] {
        const v1::RoutingStatus s = routing->Get();
        return std::vector<Sample>{{{{"window", "all"}}, s.max_vio()},
                                   {{{"window", "last"}}, s.max_vio_window()}};
      }));
  h.push_back(metrics::AddScrapeFamily(
      "splitmoe_expert_failovers_total",
      "Parts of MoE batches the attention workers resent to another expert replica",
      Kind::kCounter, [routing] {
        return std::vector<Sample>{{{}, static_cast<double>(routing->Get().failovers())}};
      }));
  return h;
}

}  // namespace

absl::Status RunRouter(const RouterOptions& options) {
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(options.model_dir));
  const model::ModelConfig config = ckpt->config();
  SPLITMOE_ASSIGN_OR_RETURN(std::string fingerprint, rpc::ModelFingerprint(options.model_dir));
  std::string config_json;
  {
    std::ifstream in(options.model_dir + "/config.json", std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    config_json = bytes.str();
  }
  // The front door tokenises text prompts and detokenises output; without a tokenizer.json it
  // serves token-id prompts only.
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  if (std::ifstream(options.model_dir + "/tokenizer.json")) {
    SPLITMOE_ASSIGN_OR_RETURN(tokenizer, tokenizer::Tokenizer::LoadFromDir(options.model_dir));
  }
  std::string model_name =
      std::filesystem::path(options.model_dir).lexically_normal().filename().string();
  if (model_name.empty()) {  // "models/DeepSeek-V3/" names the directory too
    model_name = std::filesystem::path(options.model_dir).lexically_normal().parent_path()
                     .filename().string();
  }
  const std::string served_name =
      options.served_model_name.empty() ? model_name : options.served_model_name;

  RoutingOptions routing;
  routing.max_devices = options.max_devices >= 0 ? options.max_devices
                        : config.UsesGroups()     ? static_cast<int32_t>(config.topk_group)
                                                  : 0;
  routing.bias_update_rate = options.bias_update_rate;
  routing.bias_bound = options.bias_bound;
  routing.launcher_address = options.launcher_address;
  // A new incarnation id: workers take this router's tables even if their versions are lower
  // than a previous router's.
  routing.router_id = absl::StrCat(absl::ToUnixMicros(absl::Now()), "-", ::getpid());
  SPLITMOE_ASSIGN_OR_RETURN(
      WorkerRegistry workers,
      WorkerRegistry::Create(config, options.heartbeat_interval, options.missed_heartbeats_allowed,
                             fingerprint, routing));
  // The generation actor owns public requests; the registry actor tells it which prefill and
  // decode workers serve.
  auto gauges = std::make_shared<FrontDoorGauges>();
  GenerationOptions generation_options;
  generation_options.admission_timeout = options.admission_timeout;
  generation_options.prefill_timeout = options.prefill_timeout;
  runtime::Actor<GenerationActor> generation(
      "generation", std::make_unique<GenerationActor>(config, tokenizer.get(), generation_options,
                                                      gauges));
  // The registry actor owns membership and the routing table; it tells the generation actor
  // which prefill and decode workers serve. Until the expert services have registered (or
  // `settle` has passed) it publishes no table, so workers that outlived a previous router keep
  // theirs.
  const absl::Duration settle =
      options.heartbeat_interval * (options.missed_heartbeats_allowed + 1);
  auto readiness = std::make_shared<Readiness>();
  auto registry_state = std::make_unique<RegistryActor>(
      std::move(workers), options.heartbeat_interval, settle, generation.ref(), gauges);
  registry_state->set_readiness(readiness);
  auto routing_snapshot = std::make_shared<RoutingSnapshot>();
  registry_state->set_routing_snapshot(routing_snapshot);
  runtime::Actor<RegistryActor> registry("registry", std::move(registry_state));
  registry.ScheduleAfter(options.heartbeat_interval, SweepWorkers{});

  RegistryService registry_service(registry.ref());
  ClusterInfoService info_service(registry.ref());
  GenerationService generation_service(config, tokenizer.get(), model_name, config_json,
                                       generation.ref(), options.max_streams_per_client);
  SPLITMOE_RETURN_IF_ERROR(rpc::ConfigureApiKeys(options.api_keys_file));
  rpc::RunningServer server, internal;
  if (options.internal_listen.empty()) {
    if (rpc::InternalSecurityMode() != "open" || !options.api_keys_file.empty()) {
      return absl::InvalidArgumentError(
          "router: TLS, a cluster token or API keys need --internal-listen (the internal "
          "services are never served on the public port of a closed cluster)");
    }
    SPLITMOE_ASSIGN_OR_RETURN(
        server, rpc::StartServer(options.listen,
                                 {&registry_service, &info_service, &generation_service},
                                 options.public_max_message_bytes, nullptr,
                                 options.max_streams_per_client));
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(
        server, rpc::StartServer(options.listen, {&info_service, &generation_service},
                                 options.public_max_message_bytes,
                                 grpc::InsecureServerCredentials(),
                                 options.max_streams_per_client));
    SPLITMOE_ASSIGN_OR_RETURN(internal,
                              rpc::StartServer(options.internal_listen, {&registry_service}));
  }
  std::string metrics_url;
  std::vector<metrics::Handle> metric_handles =
      RouterMetrics(gauges, readiness, routing_snapshot);
  if (!options.metrics_listen.empty()) {
    SPLITMOE_ASSIGN_OR_RETURN(metrics_url, metrics::Serve(options.metrics_listen));
  }
  // Health follows readiness from here on (NOT_SERVING until the cluster can serve), and stops
  // following it before the server (which owns the health service) goes, also on an early
  // return below.
  struct DetachHealth {
    std::shared_ptr<Readiness> readiness;
    ~DetachHealth() { readiness->AttachHealth(nullptr, {}); }
  } detach_health{readiness};
  std::vector<std::string> always_serving = {"splitmoe.v1.ClusterInfo", "grpc.health.v1.Health"};
  if (!internal.server) always_serving.push_back("splitmoe.v1.Registry");
  readiness->AttachHealth(server.server->GetHealthCheckService(), always_serving);
  if (internal.server) {  // the internal port: the registry serves whatever the cluster's state
    internal.server->GetHealthCheckService()->SetServingStatus("splitmoe.v1.Registry", true);
  }
  std::unique_ptr<HttpFrontDoor> http;
  if (!options.http_listen.empty()) {
    HttpFrontDoorOptions http_options;
    http_options.listen = options.http_listen;
    http_options.threads = options.http_threads;
    http_options.max_body_bytes = static_cast<size_t>(options.public_max_message_bytes);
    http_options.defaults.model_name = served_name;
    http_options.max_model_len = config.max_position_embeddings;
    SPLITMOE_ASSIGN_OR_RETURN(http_options.defaults,
                              SamplingDefaults(options.model_dir, http_options.defaults));
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options.public_max_message_bytes);
    args.SetMaxSendMessageSize(options.public_max_message_bytes);
    SPLITMOE_ASSIGN_OR_RETURN(http, HttpFrontDoor::Start(http_options,
                                                         server.server->InProcessChannel(args),
                                                         tokenizer.get(), readiness));
  }
  std::cout << "listening " << server.address << std::endl;
  std::cout << "internal " << (internal.server ? internal.address : server.address) << std::endl;
  gauges->SetUrls(metrics_url, http != nullptr ? absl::StrCat("http://", http->address()) : "");
  if (http != nullptr) std::cout << "http " << http->address() << std::endl;
  if (!metrics_url.empty()) std::cout << "metrics " << metrics_url << std::endl;

  const int signal = process::WaitForTerminationSignal();
  SPLITMOE_LOG(INFO, "router").With("signal", signal) << "stopping";
  if (http != nullptr) http->Stop();
  server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (internal.server) {
    internal.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }
  generation.Stop();  // fails the requests still open
  registry.Stop();
  return absl::OkStatus();
}

}  // namespace splitmoe::router
