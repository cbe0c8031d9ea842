#include "router/run_router.h"

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
#include "common/runtime/actor.h"
#include "router/expert_router.h"
#include "router/generation_actor.h"
#include "router/generation_service.h"
#include "router/registry_actor.h"
#include "router/router_services.h"

namespace splitmoe::router {
namespace {

// The checkpoint's selection bias of every MoE layer (main layers, then MTP blocks); empty for
// dense layers and for models without one. The router loads nothing else of the weights.
absl::StatusOr<std::vector<std::vector<float>>> LoadBiases(model::Checkpoint& ckpt) {
  const model::ModelConfig& c = ckpt.config();
  std::vector<std::vector<float>> biases(
      static_cast<size_t>(c.num_hidden_layers + c.num_nextn_predict_layers));
  if (!c.HasScoreBias()) return biases;
  for (size_t layer = 0; layer < biases.size(); ++layer) {
    if (!c.IsMoeLayer(static_cast<int64_t>(layer))) continue;
    const std::string name =
        absl::StrCat("model.layers.", layer, ".mlp.gate.e_score_correction_bias");
    if (layer >= static_cast<size_t>(c.num_hidden_layers) && !ckpt.Has(name))
      continue;  // MTP not shipped
    SPLITMOE_ASSIGN_OR_RETURN(biases[layer], ckpt.LoadVector(name, c.n_routed_experts));
  }
  return biases;
}

}  // namespace

absl::Status RunRouter(const RouterOptions& options) {
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(options.model_dir));
  const model::ModelConfig config = ckpt->config();
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<std::vector<float>> biases, LoadBiases(*ckpt));
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

  // The expert-router actor routes MoE batches; the registry actor owns membership and hands
  // it the expert placement after every change.
  runtime::Actor<ExpertRouter> expert_router(
      "expert-router",
      std::make_unique<ExpertRouter>(config, std::move(biases), options.max_devices));
  // The generation actor owns public requests; the registry actor tells it which prefill and
  // decode workers serve.
  auto requests_in_flight = std::make_shared<std::atomic<int32_t>>(0);
  GenerationOptions generation_options;
  generation_options.admission_timeout = options.admission_timeout;
  generation_options.prefill_timeout = options.prefill_timeout;
  runtime::Actor<GenerationActor> generation(
      "generation", std::make_unique<GenerationActor>(config, tokenizer.get(), generation_options,
                                                      requests_in_flight));
  runtime::Actor<RegistryActor> registry(
      "registry", std::make_unique<RegistryActor>(
                      WorkerRegistry(config.n_routed_experts, options.heartbeat_interval,
                                     options.missed_heartbeats_allowed, fingerprint),
                      options.heartbeat_interval, expert_router.ref(), generation.ref(),
                      requests_in_flight));
  registry.ScheduleAfter(options.heartbeat_interval, SweepWorkers{});

  RegistryService registry_service(registry.ref());
  MoeDispatchService dispatch_service(expert_router.ref());
  GenerationService generation_service(config, tokenizer.get(), model_name, config_json,
                                       generation.ref());
  SPLITMOE_ASSIGN_OR_RETURN(
      rpc::RunningServer server,
      rpc::StartServer(options.listen,
                       {&registry_service, &dispatch_service, &generation_service}));
  std::cout << "listening " << server.address << std::endl;

  const int signal = process::WaitForTerminationSignal();
  std::cerr << "router: signal " << signal << ", stopping\n";
  server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  generation.Stop();     // fails the requests still open
  registry.Stop();       // then its expert clients close with it
  expert_router.Stop();  // fails what is still pending
  return absl::OkStatus();
}

}  // namespace splitmoe::router
