// `splitmoe prefill`: a prefill worker process. Loads the attention side of the model (no
// routed expert), serves the Prefill service (health, reflection), registers with the router and
// heartbeats; writes prompts' latents into decode workers' caches over UCX. Prints
// "listening HOST:PORT" once serving; runs until SIGINT/SIGTERM, then deregisters and stops.
#ifndef SPLITMOE_PREFILL_RUN_PREFILL_H_
#define SPLITMOE_PREFILL_RUN_PREFILL_H_

#include <string>

#include "absl/status/status.h"
#include "common/engine/on_device.h"
#include "common/engine/transformer.h"
#include "common/expert_plane/direct_moe.h"
#include "common/model/checkpoint.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::prefill {

struct PrefillOptions {
  std::string model_dir;
  std::string listen = "127.0.0.1:0";
  std::string router;  // required
  std::string metrics_listen;  // Prometheus /metrics on HOST:PORT; empty: not served
  // The expert data plane: wire dtype, per-batch deadlines, failover.
  expert_plane::DirectMoeOptions moe;
  model::ResidentDType weights = model::ResidentDType::kCheckpoint;  // `--weights`
  engine::AttentionForm form = engine::AttentionForm::kAuto;
  // Prompts that arrive together are prefilled together up to this many tokens.
  int64_t batch_tokens = 2048;
  // 2: a batch of two or more sequences runs as two micro-batches in ping-pong (one's attention
  // while the other's experts compute); 1: one batch.
  int micro_batches = 1;
  // Load the MTP modules' attention side, so a destination that asks for the MTP layer
  // (a speculative decode worker) gets it; `--no-mtp`: not loaded, such a destination gets the
  // main layers only and its worker decodes one token a step.
  bool load_mtp = true;
  // `--device cpu|cuda:N`, `--precision fp32|bf16`, `--device-cache-tokens`: on a GPU the
  // forward pass and the prompts' local caches are there, and latents leave through host
  // memory (read back per layer, then put over UCX as on the CPU).
  std::string device = "cpu";
  engine::OnDeviceOptions on_device;
};

absl::Status RunPrefillWorker(const PrefillOptions& options);

}  // namespace splitmoe::prefill

#endif  // SPLITMOE_PREFILL_RUN_PREFILL_H_
