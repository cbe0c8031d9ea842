// Transformer: the DeepSeek-V2/V3 forward pass, the only one, on every backend of the op
// interface (kernels/ops.h) — embeddings, MLA (naive or absorbed form over the latent cache;
// the absorbed form attends every sequence of the batch in one call over the latents in place),
// dense SwiGLU and DeepSeekMoE layers, the final norm, the output head and the MTP module —
// exactly the math of DeepSeek's reference (inference/model.py). Routed experts are reached
// through a MoeExecutor, so the same code runs with local experts (single-process engine) or
// remote ones (the cluster).
//
// On the CPU (the reference) it computes in fp32 from weights held in fp32 or their checkpoint
// dtype, widened as read. On a GPU it runs the same steps on that device's ops with the
// weights' device copies (DeviceWeights, fp32 or BF16), activations in device memory and the
// caches in a device pool (pooled_latent_cache.h); only the absorbed attention form runs there,
// and the callers' interface stays host memory: tokens in, hidden states and logits out.
//
// A forward call takes a batch of sequence chunks: each chunk is some new tokens of one
// sequence, starting at that sequence's cache length (a whole prompt for prefill, one token for
// decode). Projections and experts run over all rows of the batch at once; so does the absorbed
// attention (decode); the expanded ("naive") form, which prompts take under kAuto, runs per
// chunk, its heads side by side. Not thread-safe: one caller at a time (the owner of the sequences' caches).
//
//   LocalMoeExecutor moe(config, weights);
//   Transformer model(config, weights, &moe);
//   LatentCache cache(config.num_hidden_layers, config.latent_dim());
//   std::vector<SequenceChunk> batch = {{prompt, &cache}};
//   SPLITMOE_RETURN_IF_ERROR(model.Forward(batch, AttentionForm::kAbsorbed, &hidden));
//   model.Logits(hidden.data() + (n - 1) * hidden_size, 1, logits.data());
#ifndef SPLITMOE_COMMON_ENGINE_TRANSFORMER_H_
#define SPLITMOE_COMMON_ENGINE_TRANSFORMER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/engine/device_weights.h"
#include "common/engine/latent_cache.h"
#include "common/engine/rope.h"
#include "common/kernels/ops.h"
#include "common/model/config.h"
#include "common/model/weights.h"

namespace splitmoe::engine {

// Computes the routed-expert part of a MoE layer. Start() begins it and Wait() ends it, so the
// caller computes the shared experts while remote experts work (and, inside a PingPong pass,
// lets the other micro-batch compute while it waits: overlap.h).
class MoeExecutor {
 public:
  // A MoE layer in flight; Wait() exactly once, before the executor goes.
  class Pending {
   public:
    virtual ~Pending() = default;
    // Fills the `out` given to Start and says whether it could.
    virtual absl::Status Wait() = 0;
  };

  virtual ~MoeExecutor() = default;
  // out[rows, hidden] = sum over each row's selected experts of gate weight * expert(x[row]).
  // `scores` [rows, n_routed] are the gate scores (after softmax/sigmoid, before any bias).
  // `layer` counts main layers first, then MTP blocks (num_hidden_layers + k). `x` and `scores`
  // are read before Start returns; `out` must stay valid until Wait returns. The pointers are
  // in the memory of the Transformer's device, which must be the executor's backend().
  virtual std::unique_ptr<Pending> Start(int64_t layer, const float* x, const float* scores,
                                         int64_t rows, float* out) = 0;
  // Start, then Wait.
  absl::Status RoutedExperts(int64_t layer, const float* x, const float* scores, int64_t rows,
                             float* out) {
    return Start(layer, x, scores, rows, out)->Wait();
  }
  // Where x, scores and out live: host memory unless the executor says otherwise.
  virtual kernels::Backend backend() const { return kernels::Backend::kCpu; }
};

// A Pending whose work is already done (an executor that computes in Start).
class DonePending : public MoeExecutor::Pending {
 public:
  explicit DonePending(absl::Status status) : status_(std::move(status)) {}
  absl::Status Wait() override { return status_; }

 private:
  absl::Status status_;
};

// Selection and expert compute with experts held in this process (done within Start; on a
// device, enqueued there within Start). `on_device`: the experts' device copies, for a
// Transformer on that device; null: the CPU.
class LocalMoeExecutor : public MoeExecutor {
 public:
  LocalMoeExecutor(const model::ModelConfig& config, const model::ModelWeights& weights,
                   const DeviceWeights* on_device = nullptr)
      : config_(config), weights_(weights), on_device_(on_device) {}
  std::unique_ptr<Pending> Start(int64_t layer, const float* x, const float* scores, int64_t rows,
                                 float* out) override;
  kernels::Backend backend() const override;

 private:
  absl::Status Compute(int64_t layer, const float* x, const float* scores, int64_t rows,
                       float* out);

  const model::ModelConfig& config_;
  const model::ModelWeights& weights_;
  const DeviceWeights* on_device_;
};

// A host executor (the cluster's, whose experts answer over the network) for a Transformer on a
// device: a layer's x and scores are copied to the host when it starts and the routed experts'
// sum back to the device when it ends — staged through host memory, the shared experts
// computing on the device meanwhile. `host` must outlive it.
class StagedMoeExecutor : public MoeExecutor {
 public:
  StagedMoeExecutor(MoeExecutor* host, const kernels::Device& device,
                    const model::ModelConfig& config)
      : host_(host), device_(device), config_(config) {}
  std::unique_ptr<Pending> Start(int64_t layer, const float* x, const float* scores, int64_t rows,
                                 float* out) override;
  kernels::Backend backend() const override { return device_.backend; }

 private:
  MoeExecutor* host_;
  kernels::Device device_;
  const model::ModelConfig& config_;
};

// Packs, for oneDNN, every weight the forward pass only uses through kernels::Linear (all
// projections, experts, gate, output heads; not the embeddings nor kv_b_proj, whose per-head
// slices are read directly) and releases their plain copies. Call once after loading, before
// any Transformer uses the weights. Also limits OpenBLAS to one thread, process-wide: oneDNN
// owns the cores, OpenBLAS runs only the per-sequence attention GEMMs, and two thread pools
// spinning on the same cores cost decode more than half its time (docs/performance.md) — in
// the engine, and in every worker and expert process, which all pack their weights here.
absl::Status PackForInference(model::ModelWeights* weights);

enum class AttentionForm {
  kAbsorbed,  // W_UK folded into the query, attention over the latents, W_UV after (decode)
  kNaive,     // K and V expanded from the latents per head (what prefill does in the reference)
  kAuto,      // per chunk, the form that costs less: expanded for prompts, absorbed for decode
};

// Whether a chunk of n new tokens after `start` cached ones costs less in the expanded form
// (every key expanded per head, then attention at qk + v_head_dim per query and key, queries in
// causal tiles) than in the absorbed one (queries and outputs absorbed per row, then attention
// at latent_dim + kv_lora_rank per query and key). The absorbed attention kernel runs at about
// half the GEMMs' rate on the CPU (docs/performance.md), so its attention term counts twice.
// Decode rows (n = 1) are always absorbed; a prompt of more than a few dozen tokens is
// expanded, as DeepSeek's and the peers' prefill does. What AttentionForm::kAuto picks.
bool ExpandedAttentionIsCheaper(const model::ModelConfig& c, int64_t n, int64_t start);

struct SequenceChunk {
  absl::Span<const int32_t> tokens;  // new tokens; the first sits at position `start`
  SequenceCache* cache;              // main layers: num_hidden_layers; MTP: one layer per module
  // Position of the first token; -1: cache->length(). Pipelined prefill (PrefillBatch) runs a
  // chunk while the one before it is still in flight, so it names its start itself.
  int64_t start = -1;
};

// Orders passes over consecutive chunks of the same sequences that run at once (pipelined
// prefill, under engine/overlap.h's ping-pong): a chunk's attention at a layer reads the
// latents the chunk before it writes there. `before_attention(layer)` may wait for them (an
// error stops the pass: the chunk before failed); `after_attention(layer)` says this pass's
// latents of `layer` are written.
struct LayerOrder {
  std::function<absl::Status(int64_t layer)> before_attention;
  std::function<void(int64_t layer)> after_attention;
};

class Transformer {
 public:
  // `on_device`: run on that device with those weight copies (they must copy `weights`, and
  // `moe` must run on that device's backend); null: the CPU.
  Transformer(const model::ModelConfig& config, const model::ModelWeights& weights,
              MoeExecutor* moe, const DeviceWeights* on_device = nullptr);

  const model::ModelConfig& config() const { return config_; }
  const kernels::Device& device() const { return device_; }

  // Runs all main layers. hidden_out [total_rows, hidden] holds the final-normed hidden states,
  // rows in batch order. Caches grow by each chunk's token count.
  // `on_layer_done(layer)`, when given, runs after each main layer: that layer's latents of
  // every chunk are then in the chunks' caches (rows length() .. length() + tokens - 1), so a
  // prefill worker can ship them while the next layer computes. An error from the hook stops
  // the pass and is returned (a cancelled prefill); the caches then hold partial rows.
  // `order`, when given, is asked before and told after each layer's attention (LayerOrder).
  // A chunk's cache then only grows: its length becomes the furthest end any pass committed.
  using LayerDoneFn = std::function<absl::Status(int64_t layer)>;
  absl::Status Forward(absl::Span<const SequenceChunk> batch, AttentionForm form,
                       std::vector<float>* hidden_out, const LayerDoneFn& on_layer_done = nullptr,
                       const LayerOrder* order = nullptr);

  // logits[rows, vocab] = hidden[rows, hidden] @ lm_head^T (host memory both).
  absl::Status Logits(const float* hidden, int64_t rows, float* logits);

  // MTP module k. For each chunk row at position p, `next_tokens` holds token p+1 and
  // `main_hidden` the main model's final-normed hidden state at p (rows in batch order, as
  // Forward produced). The chunks' caches are the module's own (one layer). mtp_logits
  // [total_rows, vocab] predict the token at p+2. `block_hidden`, when given, receives the
  // module's hidden states [total_rows, hidden] before its head's norm: what a chained draft
  // feeds the module as the "main hidden state" of the next position (speculative decoding
  // with one module drafts K tokens this way, as vLLM and SGLang do). Null `mtp_logits`: the
  // head is not run (a prefill only fills the module's cache).
  absl::Status MtpForward(int64_t k, absl::Span<const SequenceChunk> batch,
                          const float* main_hidden, AttentionForm form,
                          std::vector<float>* mtp_logits,
                          std::vector<float>* block_hidden = nullptr);
  int64_t mtp_modules() const { return static_cast<int64_t>(weights_.mtp.size()); }

 private:
  struct Pass;  // what every layer of one pass shares (positions)
  // One decoder block over h [rows, hidden] in place. `cache_layer` indexes the chunk caches.
  absl::Status Block(const model::LayerWeights& w, int64_t layer_index, int64_t cache_layer,
                     absl::Span<const SequenceChunk> batch, AttentionForm form, const Pass& pass,
                     float* h, int64_t rows, const LayerOrder* order = nullptr);
  absl::Status Attention(const model::AttentionWeights& w, const float* x, int64_t cache_layer,
                         absl::Span<const SequenceChunk> batch, AttentionForm form,
                         const Pass& pass, float* out, int64_t rows);
  absl::Status Mlp(const model::MlpWeights& w, const float* x, int64_t rows, float* out);
  // Checks the batch's tokens, reserves its caches' rows, and puts its tokens and positions
  // where the device reads them. `mtp`: the MTP module's caches (reserved from their length).
  absl::Status BeginPass(absl::Span<const SequenceChunk> batch, bool mtp, Pass* pass);
  // y[m, w.rows] = x @ w^T on the device (its copy of `w` there).
  absl::Status Lin(const float* x, int64_t m, const model::Matrix& w, float* y) const;
  // A norm vector or bias as the device reads it (null when empty).
  const float* Vec(const std::vector<float>& v) const;

  const model::ModelConfig& config_;
  const model::ModelWeights& weights_;
  MoeExecutor* moe_;
  const DeviceWeights* on_device_;
  kernels::Device device_;  // where the ops run: the CPU, or on_device_'s device
  RopeTable rope_;
  kernels::DeviceBuffer inv_freq_;  // rope_'s frequencies on the device (first pass)
  float softmax_scale_;
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_TRANSFORMER_H_
