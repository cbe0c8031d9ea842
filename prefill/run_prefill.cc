#include "prefill/run_prefill.h"

#include <iostream>

#include "common/base/log.h"
#include "common/base/status_macros.h"
#include "common/process/signals.h"
#include "common/expert_plane/attention_side.h"
#include "common/metrics/metrics.h"
#include "common/rpc/registration.h"
#include "common/rpc/rpc.h"
#include "common/runtime/actor.h"
#include "prefill/prefill_worker.h"

namespace splitmoe::prefill {

absl::Status RunPrefillWorker(const PrefillOptions& options) {
  if (options.router.empty()) return absl::InvalidArgumentError("prefill: --router is required");
  SPLITMOE_ASSIGN_OR_RETURN(
      std::unique_ptr<expert_plane::AttentionSide> side,
      expert_plane::AttentionSide::Load(options.model_dir, options.router, options.moe,
                                        options.weights, options.load_mtp, options.device,
                                        options.on_device));
  SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<transfer::UcxTransport> transport,
                            transfer::UcxTransport::Create({.name = "prefill"}));
  auto gauge = std::make_shared<decode::LoadGauge>();
  {
    runtime::Actor<PrefillActor> actor(
        "prefill", std::make_unique<PrefillActor>(
                       &side->transformer(), transport.get(), gauge, options.form,
                       options.batch_tokens, options.micro_batches,
                       std::make_unique<runtime::ThreadExecutor>("prefill-batch"),
                       side->on_device() == nullptr
                           ? PrefillActor::CacheFactory()
                           : [gpu = side->on_device()](bool mtp) { return gpu->NewCache(mtp); }));
    PrefillService service(actor.ref());
    SPLITMOE_ASSIGN_OR_RETURN(rpc::RunningServer server,
                              rpc::StartServer(options.listen, {&service}));
    v1::RegisterRequest request;
    request.set_role(v1::WORKER_ROLE_PREFILL);
    request.set_address(rpc::AdvertisedAddress(server.address));
    request.set_resident_weight_bytes(side->resident_weight_bytes());
    request.set_device(side->device_description());
    // On a GPU the latents are read back to host memory per layer and put from there.
    request.set_transfer_mode(side->on_device() == nullptr
                                  ? transfer::UcxTlsDescription()
                                  : transfer::UcxTlsDescription() +
                                        ", latents staged through host memory");
    request.set_model_fingerprint(side->fingerprint());
    // In flight first: the actor publishes its counters before it replies, so a count that
    // includes the reply sees them.
    const std::function<v1::WorkerLoad()> load = [&] {
      const int32_t in_flight = service.in_flight();
      v1::WorkerLoad load = gauge->Get();
      load.set_requests_in_flight(in_flight);
      *load.mutable_moe() = side->moe().Stats();
      return load;
    };
    metrics::Handle load_metrics = metrics::ExportWorkerLoad("prefill", load);
    if (!options.metrics_listen.empty()) {
      SPLITMOE_ASSIGN_OR_RETURN(std::string url, metrics::Serve(options.metrics_listen));
      request.set_metrics_url(url);
    }
    SPLITMOE_ASSIGN_OR_RETURN(
        std::unique_ptr<rpc::Membership> membership,
        rpc::Membership::Start(rpc::RouterAddresses(options.router), request, load));
    std::cout << "listening " << server.address << std::endl;
    const int signal = process::WaitForTerminationSignal();
    SPLITMOE_LOG(INFO, "prefill").With("signal", signal) << "stopping";
    membership.reset();
    server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    actor.Stop();
  }
  transport->Shutdown();
  return absl::OkStatus();
}

}  // namespace splitmoe::prefill
