// Capacity model: from a DeepSeek-V2/V3 config's shapes and a machine's per-stage rates (GEMM
// rate, memory bandwidth, network bandwidth and latency, per-message overhead), predicts time to
// first token, time per output token and tokens/s per device for a deployment of P prefill,
// D decode and E expert pools of R replicas (device-limited routing, micro-batching), and picks
// the split that serves the most tokens per device within a TPOT target. Pure functions.
//
// The model (docs/capacity.md): a decode step of batch B per decode device reads the attention
// side's weights once and every sequence's latents (memory), computes 2 FLOP per active
// parameter per token plus the absorbed attention's scores and sums (compute), and per MoE layer
// sends each token's hidden state to the expert pools holding its experts and back (network:
// messages to at most M pools per token); an expert device reads the weights of the experts its
// share of the batch touches and computes its tokens. Each stage takes max(bytes / bandwidth,
// FLOPs / rate); stages add, except that with two micro-batches one's attention overlaps the
// other's experts and network. `colocated` hardware runs every role on the same cores (this
// test machine), so every stage adds. Prefill: the prompt's FLOPs on one prefill device plus
// its dispatch and latent transfer.
//
//   SPLITMOE_ASSIGN_OR_RETURN(Hardware hw, ParseHardware(json_text));
//   Prediction p = Predict(config, hw, deployment);
#ifndef SPLITMOE_COMMON_PLAN_CAPACITY_H_
#define SPLITMOE_COMMON_PLAN_CAPACITY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/config.h"

namespace splitmoe::plan {

struct Hardware {
  std::string name;
  double gemm_flops = 0;        // dense GEMM rate per device at large M (FLOP/s)
  double gemm_efficiency = 1;   // share of it the model's GEMMs reach (prefill, experts)
  double mem_bw = 0;            // streaming read bandwidth per device (bytes/s)
  double mem_efficiency = 1;    // share of it decode's weight streaming reaches
  double mem_bytes = 0;         // memory per device (bytes); 0: not checked
  double net_bw = 0;            // network bandwidth per device (bytes/s, each direction)
  double net_latency_s = 0;     // one-way latency
  double message_overhead_s = 0;  // software cost per message (both ends)
  double weight_bytes = 2;      // bytes per parameter (1: FP8, 2: BF16)
  double kv_bytes = 2;          // bytes per cached latent value
  double wire_bytes = 2;        // bytes per activation value on the wire
  bool colocated = false;       // every role on the same device: stages never overlap
};

// Reads a hardware description (JSON with the fields above, rates in the units above).
absl::StatusOr<Hardware> ParseHardware(const std::string& json_text, const std::string& what);

struct Deployment {
  int64_t prefill = 1;       // prefill devices
  int64_t decode = 1;        // decode devices
  int64_t expert_pools = 1;  // shards of the routed experts
  int64_t replicas = 1;      // devices per shard
  int64_t micro_batches = 1;  // 2: ping-pong
  int64_t max_devices = 0;    // device-limited routing (pools per token); 0: topk_group or all
  int64_t decode_batch = 1;   // sequences per decode device
  int64_t prompt_tokens = 1024;
  int64_t output_tokens = 256;
  int64_t devices() const { return prefill + decode + expert_pools * replicas; }
};

// Parameter counts by where they run.
struct ModelCosts {
  double attention_params = 0;     // every layer's attention, norms, dense MLPs, shared experts,
                                   // gates, embeddings row and the output head
  double expert_params = 0;        // one routed expert
  int64_t moe_layers = 0;
  int64_t dense_layers = 0;
  double latent_values_per_token = 0;  // all layers
  double attention_flops_per_context_token = 0;  // absorbed attention, one query over one key
};
ModelCosts Costs(const model::ModelConfig& c);

struct Prediction {
  double ttft_s = 0;
  double tpot_s = 0;                  // one decode step
  double decode_tokens_per_s = 0;     // the whole deployment's output tokens/s
  double tokens_per_s_per_device = 0; // over every device of the deployment
  double prefill_tokens_per_s = 0;    // prompt tokens/s of all prefill devices together
  // The decode step's parts (per step, not overlapped) and what bounds the whole.
  double attention_s = 0, experts_s = 0, network_s = 0;
  std::string limit;
  double memory_per_decode_device = 0;  // weights + caches (bytes)
  double memory_per_expert_device = 0;
  bool fits = true;
};

Prediction Predict(const model::ModelConfig& c, const Hardware& hw, const Deployment& d);

// Every split of `devices` (and decode batch) that meets `target_tpot_s`, best tokens/s per
// device first (at most `keep`).
std::vector<std::pair<Deployment, Prediction>> BestSplits(const model::ModelConfig& c,
                                                          const Hardware& hw, int64_t devices,
                                                          double target_tpot_s,
                                                          const Deployment& shape, size_t keep);

}  // namespace splitmoe::plan

#endif  // SPLITMOE_COMMON_PLAN_CAPACITY_H_
