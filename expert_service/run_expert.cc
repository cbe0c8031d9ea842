#include "expert_service/run_expert.h"

#include <iostream>

#include "common/base/log.h"
#include "absl/strings/str_cat.h"

#include "common/base/status_macros.h"
#include "common/expert_plane/routing_table_watcher.h"
#include "common/process/signals.h"
#include "common/metrics/metrics.h"
#include "common/rpc/registration.h"
#include "common/rpc/rpc.h"
#include "common/runtime/actor.h"
#include "common/transfer/ucx_transport.h"
#include "expert_service/expert_service.h"
#include "expert_service/placement_loader.h"

namespace splitmoe::expert_service {

absl::Status RunExpert(const ExpertOptions& options) {
  SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<ExpertShard> shard,
                            ExpertShard::Load(options.model_dir, options.shard));
  const uint64_t resident = shard->resident_bytes();
  const std::string device = shard->device();
  const int64_t n_routed_experts = shard->config().n_routed_experts;
  std::vector<int32_t> experts = shard->experts();
  // The experts actor owns the shard; the service only posts to it.
  runtime::Actor<ExpertsActor> actor("experts", std::make_unique<ExpertsActor>(std::move(shard)));
  actor.SetIdleSpin(options.busy_poll);
  ExpertIngress ingress(actor.ref());
  ExpertComputeService service(&ingress);
  SPLITMOE_ASSIGN_OR_RETURN(rpc::RunningServer server,
                            rpc::StartServer(options.listen, {&service}));
  std::unique_ptr<UcxExpertServer> ucx;
  if (options.ucx) {
    SPLITMOE_ASSIGN_OR_RETURN(
        ucx, UcxExpertServer::Start(&ingress, absl::StrCat("expert-", options.shard.shard),
                                    options.busy_poll));
  }
  // On every way out, the actor stops (answering what it holds, through `ingress` and `ucx`)
  // before they go: declared after them, destroyed before them.
  struct StopActorFirst {
    runtime::Actor<ExpertsActor>& actor;
    ~StopActorFirst() { actor.Stop(); }
  } stop_actor_first{actor};
  std::unique_ptr<rpc::Membership> membership;
  // The routing table, as every worker sees it: the drain below waits until it no longer lists
  // this replica.
  std::unique_ptr<expert_plane::RoutingTableWatcher> table;
  // EPLB: the placements the table names, loaded beside the default one.
  std::unique_ptr<PlacementLoader> placements;
  const std::string address = rpc::AdvertisedAddress(server.address);
  // The load the heartbeat reports, also the metrics' (dropped before what it reads).
  const std::function<v1::WorkerLoad()> load = [&] {
    v1::WorkerLoad load;
    load.set_tokens_processed(ingress.assignments());
    if (placements != nullptr) {
      for (uint64_t id : placements->Ready()) load.add_placements_ready(id);
    }
    return load;
  };
  metrics::Handle load_metrics = metrics::ExportWorkerLoad("expert", load);
  if (options.router.empty() && !options.metrics_listen.empty()) {
    SPLITMOE_RETURN_IF_ERROR(metrics::Serve(options.metrics_listen).status());
  }
  if (!options.router.empty()) {
    table = expert_plane::RoutingTableWatcher::Start(options.router);
    placements = std::make_unique<PlacementLoader>(options.model_dir, options.shard,
                                                   n_routed_experts, table.get(), actor.ref());
    v1::RegisterRequest request;
    request.set_role(v1::WORKER_ROLE_EXPERT);
    request.set_address(address);
    request.set_shard(options.shard.shard);
    *request.mutable_experts() = {experts.begin(), experts.end()};
    request.set_resident_weight_bytes(resident);
    request.set_device(device);
    if (ucx != nullptr) {
      request.set_ucx_worker_address(ucx->WorkerAddress());
      request.set_transfer_mode(transfer::UcxTlsDescription());
    } else {
      request.set_transfer_mode("grpc");
    }
    SPLITMOE_ASSIGN_OR_RETURN(std::string fingerprint, rpc::ModelFingerprint(options.model_dir));
    request.set_model_fingerprint(fingerprint);
    if (!options.metrics_listen.empty()) {
      SPLITMOE_ASSIGN_OR_RETURN(std::string url, metrics::Serve(options.metrics_listen));
      request.set_metrics_url(url);
    }
    SPLITMOE_ASSIGN_OR_RETURN(membership, rpc::Membership::Start(
                                              rpc::RouterAddresses(options.router), request, load));
  }
  std::cout << "listening " << server.address << std::endl;
  const int signal = process::WaitForTerminationSignal();
  SPLITMOE_LOG(INFO, "expert").With("shard", options.shard.shard).With("signal", signal)
      << "stopping";
  // Drain: deregister first, so the router publishes a table without this replica and the
  // attention workers send it nothing new; wait until that table has reached this process too
  // (the workers get it on the same kind of stream) and nothing has arrived for 100 ms, and
  // finish what is in flight (all bounded by 10 s) before the server stops. A batch that still
  // arrives later fails over to another replica.
  membership.reset();
  auto listed = [&] {
    std::shared_ptr<const v1::RoutingTable> t = table != nullptr ? table->Current() : nullptr;
    if (t == nullptr) return false;
    for (const v1::ExpertPool& pool : t->pools()) {
      for (const v1::ExpertReplica& r : pool.replicas()) {
        if (r.address() == address) return true;
      }
    }
    return false;
  };
  const absl::Time drain_start = absl::Now();
  while (absl::Now() - drain_start < absl::Seconds(10)) {
    const bool quiet = absl::Now() - ingress.last_batch() > absl::Milliseconds(100);
    if (!listed() && ingress.in_flight() == 0 && quiet &&
        absl::Now() - drain_start > absl::Milliseconds(100)) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  placements.reset();
  table.reset();
  SPLITMOE_LOG(INFO, "expert").With("shard", options.shard.shard)
          .With("batches_in_flight", ingress.in_flight())
      << "drained";
  server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  // The actor's last answers still go out through `ucx`, which therefore stops after it.
  actor.Stop();
  ucx.reset();
  return absl::OkStatus();
}

}  // namespace splitmoe::expert_service
