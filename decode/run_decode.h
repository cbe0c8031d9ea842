// `splitmoe decode`: a decode worker process. Loads the attention side of the model (no routed
// expert), allocates its paged latent cache inside a UCX-registered region, serves the Decode
// service (health, reflection), registers with the router (cache geometry, UCX address) and
// heartbeats its load; prints "listening HOST:PORT" once serving; runs until SIGINT/SIGTERM,
// then deregisters and stops.
#ifndef SPLITMOE_DECODE_RUN_DECODE_H_
#define SPLITMOE_DECODE_RUN_DECODE_H_

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/expert_plane/direct_moe.h"
#include "common/model/checkpoint.h"
#include "decode/paged_latent_cache.h"
#include "splitmoe/v1/internal.pb.h"

namespace splitmoe::decode {

struct DecodeOptions {
  std::string model_dir;
  std::string listen = "127.0.0.1:0";
  std::string router;  // required: registration and the routing table
  std::string metrics_listen;  // Prometheus /metrics on HOST:PORT; empty: not served
  int64_t cache_blocks = 256;
  int64_t block_tokens = 64;
  LatentDType cache_dtype = LatentDType::kFloat32;
  // The expert data plane: wire dtype, per-batch deadlines, failover.
  expert_plane::DirectMoeOptions moe;
  model::ResidentDType weights = model::ResidentDType::kCheckpoint;  // `--weights`
  absl::Duration reclaim_grace = absl::Seconds(5);
  // 2: a batch of two or more sequences runs as two micro-batches in ping-pong (one's attention
  // while the other's experts compute); 1: one batch.
  int micro_batches = 1;
  // Speculative decoding with the MTP module (`--speculative mtp --draft-tokens K`): K drafts
  // per verification pass; 0: off. The cache then keeps the module's latents as one more layer.
  int64_t draft_tokens = 0;
  // `--reserve-upfront`: reservations take prompt + max_tokens (nothing is preempted); otherwise
  // prompt + `--reserve-margin-tokens` (0: one block) and the cache grows (DecodeActorOptions).
  bool reserve_upfront = false;
  int64_t reserve_margin_tokens = 0;
  bool prefix_cache = true;  // `--no-prefix-cache` turns it off
  // `--device cpu|cuda:N`, `--precision fp32|bf16`: on a GPU the forward pass runs there over a
  // device copy of the paged cache (decode/device_arena.h); prompts' latents still land in the
  // host arena (UCX puts) and are staged to the device.
  std::string device = "cpu";
  model::WeightDType device_weights = model::WeightDType::kFloat32;
};

absl::Status RunDecode(const DecodeOptions& options);

}  // namespace splitmoe::decode

#endif  // SPLITMOE_DECODE_RUN_DECODE_H_
