#include "decode/run_decode.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/base/log.h"
#include "common/base/status_macros.h"
#include "common/process/signals.h"
#include "common/expert_plane/attention_side.h"
#include "common/metrics/metrics.h"
#include "common/rpc/registration.h"
#include "common/rpc/rpc.h"
#include "common/runtime/actor.h"
#include "common/transfer/ucx_transport.h"
#include "decode/decode_worker.h"

namespace splitmoe::decode {

absl::Status RunDecode(const DecodeOptions& options) {
  if (options.router.empty()) return absl::InvalidArgumentError("decode: --router is required");
  if (options.cache_blocks <= 0 || options.block_tokens <= 0) {
    return absl::InvalidArgumentError("decode: --cache-blocks and --block-tokens must be > 0");
  }
  SPLITMOE_ASSIGN_OR_RETURN(
      std::unique_ptr<expert_plane::AttentionSide> side,
      expert_plane::AttentionSide::Load(
          options.model_dir, options.router, options.moe, options.weights,
          /*load_mtp=*/options.draft_tokens > 0, options.device,
          // The caches are the arena's device copy, not a pool of the device's own.
          engine::OnDeviceOptions{.weights = options.device_weights, .cache_tokens = 0}));
  const model::ModelConfig& c = side->config();
  int64_t draft_tokens = options.draft_tokens;
  if (draft_tokens > 0 && side->transformer().mtp_modules() == 0) {
    SPLITMOE_LOG(WARNING, "decode").With("model", options.model_dir)
        << "--speculative mtp asked for, but the model ships no MTP module: decoding one token "
           "a step";
    draft_tokens = 0;
  }

  SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<transfer::UcxTransport> transport,
                            transfer::UcxTransport::Create({.name = "decode"}));
  // With speculative decoding, MTP module 0's latents are one more layer after the model's.
  PagedLatentLayout layout{.num_layers = c.num_hidden_layers + (draft_tokens > 0 ? 1 : 0),
                           .latent_dim = c.latent_dim(),
                           .block_tokens = options.block_tokens,
                           .dtype = options.cache_dtype};
  SPLITMOE_RETURN_IF_ERROR(layout.Validate());
  SPLITMOE_ASSIGN_OR_RETURN(
      transfer::Region region,
      transport->RegisterRegion(static_cast<size_t>(options.cache_blocks * layout.block_bytes())));
  PagedLatentCacheOptions cache_options;
  cache_options.layout = layout;
  cache_options.num_blocks = options.cache_blocks;
  cache_options.arena = region.base;
  cache_options.arena_bytes = static_cast<int64_t>(region.size_bytes);
  SPLITMOE_ASSIGN_OR_RETURN(PagedLatentCache cache, PagedLatentCache::Create(cache_options));
  // On a GPU: the arena's copy there (the host arena stays where prefill workers put).
  std::unique_ptr<DeviceArena> device_arena;
  if (side->on_device() != nullptr) {
    SPLITMOE_ASSIGN_OR_RETURN(device_arena,
                              DeviceArena::Create(side->on_device()->device(), layout,
                                                  cache.arena_base(), cache.num_blocks()));
  }

  DecodeActorOptions actor_options;
  actor_options.ucx_worker_address = transport->WorkerAddress();
  actor_options.rkey = region.rkey;
  actor_options.remote_base = reinterpret_cast<uint64_t>(region.base);
  actor_options.region_bytes = region.size_bytes;
  actor_options.transfer_mode =
      device_arena == nullptr
          ? transfer::UcxTlsDescription()
          : absl::StrCat(transfer::UcxTlsDescription(), ", latents ", device_arena->Describe(),
                         transport->ReachesCudaMemory()
                             ? " (this UCX can reach CUDA memory; puts straight into it are not "
                               "built)"
                             : " (this UCX has no CUDA transport)");
  actor_options.device_arena = device_arena.get();
  actor_options.reclaim_grace = options.reclaim_grace;
  actor_options.micro_batches = options.micro_batches;
  actor_options.draft_tokens = draft_tokens;
  actor_options.reserve_upfront = options.reserve_upfront;
  actor_options.reserve_margin_tokens = options.reserve_margin_tokens;
  actor_options.prefix_cache = options.prefix_cache;
  auto gauge = std::make_shared<LoadGauge>();
  {
    runtime::Actor<DecodeActor> actor(
        "decode", std::make_unique<DecodeActor>(
                      &side->transformer(), std::move(cache), actor_options, gauge,
                      std::make_unique<runtime::ThreadExecutor>("decode-step")));
    DecodeService service(actor.ref());
    SPLITMOE_ASSIGN_OR_RETURN(rpc::RunningServer server,
                              rpc::StartServer(options.listen, {&service}));
    v1::RegisterRequest request;
    request.set_role(v1::WORKER_ROLE_DECODE);
    request.set_address(rpc::AdvertisedAddress(server.address));
    request.set_resident_weight_bytes(side->resident_weight_bytes());
    request.set_device(side->device_description());
    request.set_cache_blocks(static_cast<int32_t>(options.cache_blocks));
    request.set_block_tokens(static_cast<int32_t>(options.block_tokens));
    request.set_ucx_worker_address(transport->WorkerAddress());
    request.set_transfer_mode(actor_options.transfer_mode);
    request.set_model_fingerprint(side->fingerprint());
    const std::function<v1::WorkerLoad()> load = [gauge, &side] {
      v1::WorkerLoad load = gauge->Get();
      *load.mutable_moe() = side->moe().Stats();
      return load;
    };
    metrics::Handle load_metrics = metrics::ExportWorkerLoad("decode", load);
    if (!options.metrics_listen.empty()) {
      SPLITMOE_ASSIGN_OR_RETURN(std::string url, metrics::Serve(options.metrics_listen));
      request.set_metrics_url(url);
    }
    SPLITMOE_ASSIGN_OR_RETURN(
        std::unique_ptr<rpc::Membership> membership,
        rpc::Membership::Start(rpc::RouterAddresses(options.router), request, load));
    SPLITMOE_LOG(INFO, "decode").With("cache_blocks", options.cache_blocks)
            .With("block_tokens", options.block_tokens)
            .With("cache_mib", options.cache_blocks * layout.block_bytes() >> 20)
            .With("cache_dtype", layout.dtype == LatentDType::kFloat32 ? "fp32" : "bf16")
            .With("transfer", actor_options.transfer_mode)
            .With("device", side->device_description())
            .With("micro_batches", options.micro_batches)
            .With("draft_tokens", draft_tokens)
            .With("reserve", options.reserve_upfront ? "upfront" : "grow")
            .With("prefix_cache", options.prefix_cache)
        << "serving";
    std::cout << "listening " << server.address << std::endl;

    const int signal = process::WaitForTerminationSignal();
    SPLITMOE_LOG(INFO, "decode").With("signal", signal) << "stopping";
    membership.reset();  // deregister: the router sends nothing new here
    server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    actor.Stop();  // before the transport: the cache lives in its region
  }
  device_arena.reset();  // unpins the region: before the transport releases it
  transport->Shutdown();
  return absl::OkStatus();
}

}  // namespace splitmoe::decode
