#include "router/run_router.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/process/signals.h"
#include "common/rpc/rpc.h"
#include "common/rpc/security.h"
#include "common/runtime/actor.h"
#include "router/generation_actor.h"
#include "router/generation_service.h"
#include "router/registry_actor.h"
#include "router/router_services.h"

namespace splitmoe::router {

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
  const std::string model_name =
      std::filesystem::path(options.model_dir).lexically_normal().filename().string();

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
  runtime::Actor<RegistryActor> registry(
      "registry", std::make_unique<RegistryActor>(std::move(workers), options.heartbeat_interval,
                                                  settle, generation.ref(), gauges));
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
  std::cout << "listening " << server.address << std::endl;
  std::cout << "internal " << (internal.server ? internal.address : server.address) << std::endl;

  const int signal = process::WaitForTerminationSignal();
  std::cerr << "router: signal " << signal << ", stopping\n";
  server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (internal.server) {
    internal.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }
  generation.Stop();  // fails the requests still open
  registry.Stop();
  return absl::OkStatus();
}

}  // namespace splitmoe::router
