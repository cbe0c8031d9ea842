#include "router/run_router.h"

#include <iostream>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/process/signals.h"
#include "common/rpc/rpc.h"
#include "common/runtime/state_actor.h"
#include "router/expert_router.h"
#include "router/registry.h"
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

  // The expert-router actor; its completions are posted back to itself.
  runtime::StateActor<ExpertRouter>* router_actor = nullptr;
  PostFn self_post = [&router_actor](std::function<void()> task) {
    return router_actor->Post([task = std::move(task)](ExpertRouter&) { task(); });
  };
  runtime::StateActor<ExpertRouter> expert_router(
      "expert-router",
      std::make_unique<ExpertRouter>(config, std::move(biases), self_post, options.max_devices));
  router_actor = &expert_router;

  // The registry actor: membership, health, and the expert placement derived from them.
  auto registry_state = std::make_unique<WorkerRegistry>(
      config.n_routed_experts, options.heartbeat_interval, options.missed_heartbeats_allowed, "");
  runtime::StateActor<WorkerRegistry> registry("registry", std::move(registry_state));
  auto clients = std::make_shared<std::map<std::string, std::shared_ptr<ExpertClient>>>();
  // Runs on the registry actor after membership changes: connect to new expert services (briefly
  // blocking this actor, never the expert router) and hand the new placement over.
  auto publish = [clients, &expert_router](WorkerRegistry& r) {
    ServicePlacement placement = r.Placement();
    std::map<std::string, std::shared_ptr<ExpertClient>> next;
    for (size_t i = 0; i < placement.services.size(); ++i) {
      auto existing = clients->find(placement.services[i]);
      if (existing != clients->end() && !existing->second->broken()) {
        next[placement.services[i]] = existing->second;
        continue;
      }
      auto client = ExpertClient::Connect(placement.addresses[i]);
      if (!client.ok()) {
        std::cerr << "router: " << client.status() << "\n";
        continue;
      }
      next[placement.services[i]] = std::move(*client);
    }
    *clients = next;
    expert_router.Post([placement, next](ExpertRouter& er) { er.SetPlacement(placement, next); });
  };
  std::function<void(WorkerRegistry&)> sweep;
  sweep = [&sweep, &registry, publish, interval = options.heartbeat_interval](WorkerRegistry& r) {
    std::vector<std::string> lost = r.Sweep(absl::Now());
    for (const std::string& id : lost)
      std::cerr << "router: worker " << id << " stopped heartbeating: out of service\n";
    if (!lost.empty()) publish(r);
    registry.PostAfter(interval, sweep);
  };
  registry.PostAfter(options.heartbeat_interval, sweep);

  RegistryService registry_service(registry.Poster(), publish);
  MoeDispatchService dispatch_service(expert_router.Poster());
  SPLITMOE_ASSIGN_OR_RETURN(
      rpc::RunningServer server,
      rpc::StartServer(options.listen, {&registry_service, &dispatch_service}));
  std::cout << "listening " << server.address << std::endl;

  const int signal = process::WaitForTerminationSignal();
  std::cerr << "router: signal " << signal << ", stopping\n";
  server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  registry.Stop();
  expert_router.Stop();
  clients->clear();
  return absl::OkStatus();
}

}  // namespace splitmoe::router
