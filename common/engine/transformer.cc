#include "common/engine/transformer.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/engine/routing.h"
#include "common/kernels/cpu/mla_attention.h"
#include "common/kernels/cpu/narrow_linear.h"
#include "common/kernels/cpu/threads.h"
#include "common/kernels/cpu_ops.h"
#include "common/kernels/ops.h"
#include "common/kernels/packed_linear.h"

namespace splitmoe::engine {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t TotalRows(absl::Span<const SequenceChunk> batch) {
  int64_t rows = 0;
  for (const SequenceChunk& c : batch) rows += static_cast<int64_t>(c.tokens.size());
  return rows;
}

int64_t StartOf(const SequenceChunk& chunk) {
  return chunk.start >= 0 ? chunk.start : chunk.cache->length();
}

}  // namespace

namespace {

// A thread's buffers for the expanded attention: one head's keys and values, one query tile's
// scores. Grow, never shrink.
struct ExpandedScratch {
  std::vector<float> kv, scores;
};
ExpandedScratch& ThreadExpandedScratch() {
  thread_local ExpandedScratch scratch;
  return scratch;
}

// Query rows per tile of the expanded attention: a tile attends only the keys its last row may
// see, so a prompt's causal half of the score matrix is mostly skipped.
constexpr int64_t kQueryTile = 64;

using kernels::Grouped;
using kernels::Task;

}  // namespace

std::unique_ptr<MoeExecutor::Pending> LocalMoeExecutor::Start(int64_t layer, const float* x,
                                                              const float* scores, int64_t rows,
                                                              float* out) {
  return std::make_unique<DonePending>(Compute(layer, x, scores, rows, out));
}

kernels::Backend LocalMoeExecutor::backend() const {
  return on_device_ == nullptr ? kernels::Backend::kCpu : on_device_->device().backend;
}

absl::Status LocalMoeExecutor::Compute(int64_t layer, const float* x, const float* scores,
                                       int64_t rows, float* out) {
  const model::LayerWeights& w =
      layer < config_.num_hidden_layers
          ? weights_.layers[static_cast<size_t>(layer)]
          : weights_.mtp[static_cast<size_t>(layer - config_.num_hidden_layers)].block;
  const int64_t k = config_.num_experts_per_tok;
  const kernels::Device device = on_device_ == nullptr ? kernels::Device{} : on_device_->device();
  // The choice [rows, k], in the device's memory.
  SPLITMOE_ASSIGN_OR_RETURN(kernels::DeviceBuffer experts,
                            kernels::Allocate(device, static_cast<size_t>(rows * k) * 4));
  SPLITMOE_ASSIGN_OR_RETURN(kernels::DeviceBuffer weights,
                            kernels::Allocate(device, static_cast<size_t>(rows * k) * 4));
  const float* bias = on_device_ != nullptr ? on_device_->Find(w.gate_bias)
                      : w.gate_bias.empty() ? nullptr
                                            : w.gate_bias.data();
  SPLITMOE_RETURN_IF_ERROR(kernels::SelectExperts(
      device, {&config_, scores, bias, rows, experts.as<int32_t>(), weights.as<float>()}));
  const std::vector<const model::MlpWeights*> held = w.HeldExperts();
  kernels::RoutedExpertsParams p;
  p.x = x;
  p.tokens = rows;
  p.hidden = config_.hidden_size;
  p.inter = config_.moe_intermediate_size;
  p.top_k = k;
  p.experts = experts.as<int32_t>();
  p.weights = weights.as<float>();
  p.out = out;
  if (on_device_ == nullptr) {
    p.host = held;
  } else {
    const DeviceWeights::Experts* on = on_device_->FindExperts(w);
    if (on == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("layer ", layer, ": no routed experts on ", kernels::DeviceName(device)));
    }
    p.gate_up_device = on->gate_up;
    p.down_device = on->down;
    p.device_dtype = on_device_->matrices();
  }
  return Annotate(kernels::RoutedExperts(device, p),
                  absl::StrCat("layer ", layer, " in this process"));
}

namespace {

// A layer of a StagedMoeExecutor: the host's buffers, and where the sum goes on the device.
class StagedPending : public MoeExecutor::Pending {
 public:
  StagedPending(const kernels::Device& device, float* device_out, size_t out_values)
      : device_(device), device_out_(device_out), out(out_values) {}
  absl::Status Wait() override {
    absl::Status s = inner->Wait();
    if (!s.ok()) return s;
    return kernels::CopyToDevice(device_, device_out_, out.data(), out.size() * sizeof(float));
  }

  kernels::Device device_;
  float* device_out_;
  std::vector<float> x, scores, out;
  std::unique_ptr<MoeExecutor::Pending> inner;
};

}  // namespace

std::unique_ptr<MoeExecutor::Pending> StagedMoeExecutor::Start(int64_t layer, const float* x,
                                                               const float* scores, int64_t rows,
                                                               float* out) {
  const size_t hidden = static_cast<size_t>(rows * config_.hidden_size);
  const size_t routed = static_cast<size_t>(rows * config_.n_routed_experts);
  auto pending = std::make_unique<StagedPending>(device_, out, hidden);
  pending->x.resize(hidden);
  pending->scores.resize(routed);
  absl::Status s = kernels::CopyToHost(device_, pending->x.data(), x, hidden * sizeof(float));
  if (s.ok()) {
    s = kernels::CopyToHost(device_, pending->scores.data(), scores, routed * sizeof(float));
  }
  if (!s.ok()) return std::make_unique<DonePending>(s);
  pending->inner = host_->Start(layer, pending->x.data(), pending->scores.data(), rows,
                                pending->out.data());
  return pending;
}

namespace {

absl::Status Pack(model::Matrix* m) {
  if (m->data.empty()) return absl::OkStatus();  // absent in this model or this role
  SPLITMOE_ASSIGN_OR_RETURN(m->packed, kernels::PackedLinear::Create(*m));
  m->packed_bytes = m->packed->bytes();
  m->data = std::vector<float>();
  return absl::OkStatus();
}

absl::Status PackMlp(model::MlpWeights* mlp) {
  SPLITMOE_RETURN_IF_ERROR(Pack(&mlp->gate));
  SPLITMOE_RETURN_IF_ERROR(Pack(&mlp->up));
  return Pack(&mlp->down);
}

absl::Status PackLayer(model::LayerWeights* l) {
  for (model::Matrix* m : {&l->attn.q_proj, &l->attn.q_a_proj, &l->attn.q_b_proj,
                           &l->attn.kv_a_proj, &l->attn.o_proj, &l->gate}) {
    SPLITMOE_RETURN_IF_ERROR(Pack(m));
  }
  SPLITMOE_RETURN_IF_ERROR(PackMlp(&l->dense));
  SPLITMOE_RETURN_IF_ERROR(PackMlp(&l->shared));
  for (auto& e : l->experts) {
    if (e) SPLITMOE_RETURN_IF_ERROR(PackMlp(e.get()));
  }
  return absl::OkStatus();
}

}  // namespace

bool ExpandedAttentionIsCheaper(const model::ModelConfig& c, int64_t n, int64_t start) {
  if (n <= 1) return false;
  const double heads = static_cast<double>(c.num_attention_heads);
  const double kvr = static_cast<double>(c.kv_lora_rank);
  const double dn = static_cast<double>(c.qk_nope_head_dim), dv = static_cast<double>(c.v_head_dim);
  const double qk = static_cast<double>(c.qk_head_dim()), lat = static_cast<double>(c.latent_dim());
  double tiled_pairs = 0.0;  // (query, key) pairs the expanded form computes
  for (int64_t t0 = 0; t0 < n; t0 += kQueryTile) {
    const int64_t tn = std::min(kQueryTile, n - t0);
    tiled_pairs += static_cast<double>(tn) * static_cast<double>(start + t0 + tn);
  }
  const double nn = static_cast<double>(n);
  const double pairs = nn * static_cast<double>(start) + nn * (nn + 1) / 2;
  const double absorbed = nn * heads * 2 * kvr * (dn + dv) + 2 * pairs * heads * 2 * (lat + kvr);
  const double expanded = static_cast<double>(start + n) * heads * 2 * kvr * (dn + dv) +
                          tiled_pairs * heads * 2 * (qk + dv);
  return expanded < absorbed;
}


absl::Status PackForInference(model::ModelWeights* w) {
  kernels::SetBlasThreads(1);
  for (auto& layer : w->layers) SPLITMOE_RETURN_IF_ERROR(PackLayer(&layer));
  SPLITMOE_RETURN_IF_ERROR(Pack(&w->lm_head));
  for (auto& m : w->mtp) {
    SPLITMOE_RETURN_IF_ERROR(Pack(&m.eh_proj));
    SPLITMOE_RETURN_IF_ERROR(Pack(&m.head));
    SPLITMOE_RETURN_IF_ERROR(PackLayer(&m.block));
  }
  return absl::OkStatus();
}

namespace {

// One step's activations, in the device's memory (zeroed), freed when the step ends (on a GPU in
// stream order, after the work enqueued on them).
class Scratch {
 public:
  explicit Scratch(const kernels::Device& device) : device_(device) {}
  template <typename T = float>
  absl::StatusOr<T*> Get(int64_t n) {
    SPLITMOE_ASSIGN_OR_RETURN(
        kernels::DeviceBuffer b,
        kernels::Allocate(device_, static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T)));
    buffers_.push_back(std::move(b));
    return buffers_.back().as<T>();
  }

 private:
  kernels::Device device_;
  std::vector<kernels::DeviceBuffer> buffers_;
};

bool OnCpu(const kernels::Device& d) { return d.backend == kernels::Backend::kCpu; }

}  // namespace

struct Transformer::Pass {
  Scratch scratch;
  std::vector<int32_t> tokens, positions;      // every row of the batch, in batch order
  const int32_t* device_tokens = nullptr;      // the same where the device reads them
  const int32_t* device_positions = nullptr;
  explicit Pass(const kernels::Device& d) : scratch(d) {}
};

Transformer::Transformer(const model::ModelConfig& config, const model::ModelWeights& weights,
                         MoeExecutor* moe, const DeviceWeights* on_device)
    : config_(config),
      weights_(weights),
      moe_(moe),
      on_device_(on_device),
      device_(on_device == nullptr ? kernels::Device{} : on_device->device()),
      rope_(config),
      softmax_scale_(static_cast<float>(config.SoftmaxScale())) {}

absl::Status Transformer::Lin(const float* x, int64_t m, const model::Matrix& w, float* y) const {
  if (OnCpu(device_)) {
    kernels::Linear(x, m, w, y);
    return absl::OkStatus();
  }
  const DeviceWeights::Tensor t = on_device_->Find(w);
  if (t.data == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "a ", w.rows, "x", w.cols, " weight has no copy on ", kernels::DeviceName(device_)));
  }
  return kernels::Linear(device_, {x, m, &w, t.data, t.dtype, y});
}

const float* Transformer::Vec(const std::vector<float>& v) const {
  if (v.empty()) return nullptr;
  return OnCpu(device_) ? v.data() : on_device_->Find(v);
}

absl::Status Transformer::BeginPass(absl::Span<const SequenceChunk> batch, bool mtp, Pass* pass) {
  const model::ModelConfig& c = config_;
  if (moe_ != nullptr && moe_->backend() != device_.backend) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the MoE executor's buffers are not in ", kernels::DeviceName(device_),
        "'s memory: a Transformer on a device needs an executor for that device"));
  }
  for (const SequenceChunk& chunk : batch) {
    const int64_t start = StartOf(chunk);
    for (size_t i = 0; i < chunk.tokens.size(); ++i) {
      const int32_t t = chunk.tokens[i];
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " outside the vocabulary [0, ", c.vocab_size, ")"));
      }
      pass->tokens.push_back(t);
      pass->positions.push_back(static_cast<int32_t>(start + static_cast<int64_t>(i)));
    }
    const int64_t end = start + static_cast<int64_t>(chunk.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence of ", end,
                                                     " tokens exceeds max_position_embeddings ",
                                                     c.max_position_embeddings));
    }
    // An MTP module's cache grows from its own length (its chunks name no start).
    SPLITMOE_RETURN_IF_ERROR(chunk.cache->Reserve(
        mtp ? chunk.cache->length() + static_cast<int64_t>(chunk.tokens.size()) : end));
  }
  if (OnCpu(device_)) {
    pass->device_tokens = pass->tokens.data();
    pass->device_positions = pass->positions.data();
    return absl::OkStatus();
  }
  if (inv_freq_.data() == nullptr) {
    const std::vector<float>& f = rope_.inv_freq();
    SPLITMOE_ASSIGN_OR_RETURN(inv_freq_, kernels::Allocate(device_, f.size() * sizeof(float)));
    SPLITMOE_RETURN_IF_ERROR(
        kernels::CopyToDevice(device_, inv_freq_.data(), f.data(), f.size() * sizeof(float)));
  }
  const int64_t rows = static_cast<int64_t>(pass->tokens.size());
  SPLITMOE_ASSIGN_OR_RETURN(int32_t* ids, pass->scratch.Get<int32_t>(2 * rows));
  SPLITMOE_RETURN_IF_ERROR(
      kernels::CopyToDevice(device_, ids, pass->tokens.data(), static_cast<size_t>(rows) * 4));
  SPLITMOE_RETURN_IF_ERROR(kernels::CopyToDevice(device_, ids + rows, pass->positions.data(),
                                                 static_cast<size_t>(rows) * 4));
  pass->device_tokens = ids;
  pass->device_positions = ids + rows;
  return absl::OkStatus();
}

absl::Status Transformer::Mlp(const model::MlpWeights& w, const float* x, int64_t rows,
                              float* out) {
  const int64_t inter = w.gate.rows, hidden = w.gate.cols;
  Scratch scratch(device_);
  SPLITMOE_ASSIGN_OR_RETURN(float* g, scratch.Get(rows * inter));
  SPLITMOE_ASSIGN_OR_RETURN(float* u, scratch.Get(rows * inter));
  if (OnCpu(device_) && Grouped(w.gate, rows) && Grouped(w.up, rows)) {
    const kernels::LinearTask both[] = {Task(x, hidden, rows, w.gate, g, inter),
                                        Task(x, hidden, rows, w.up, u, inter)};
    SPLITMOE_RETURN_IF_ERROR(kernels::GroupedLinear(both));
  } else {
    SPLITMOE_RETURN_IF_ERROR(Lin(x, rows, w.gate, g));
    SPLITMOE_RETURN_IF_ERROR(Lin(x, rows, w.up, u));
  }
  SPLITMOE_RETURN_IF_ERROR(kernels::SwiGlu(device_, {g, u, rows * inter}));
  return Lin(g, rows, w.down, out);
}

absl::Status Transformer::Attention(const model::AttentionWeights& w, const float* x,
                                    int64_t cache_layer, absl::Span<const SequenceChunk> batch,
                                    AttentionForm form, const Pass& pass, float* out,
                                    int64_t rows) {
  const model::ModelConfig& c = config_;
  const int64_t heads = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  const int64_t dv = c.v_head_dim, kvr = c.kv_lora_rank, qk = c.qk_head_dim(), lat = c.latent_dim();
  const float eps = static_cast<float>(c.rms_norm_eps);
  const bool cpu = OnCpu(device_);
  const float* inv_freq = cpu ? rope_.inv_freq().data() : inv_freq_.as<const float>();
  Scratch scratch(device_);

  // Queries q [rows, heads, qk]; latents kv [rows, kv_lora_rank + rope].
  SPLITMOE_ASSIGN_OR_RETURN(float* q, scratch.Get(rows * heads * qk));
  SPLITMOE_ASSIGN_OR_RETURN(float* kv, scratch.Get(rows * lat));
  const int64_t hidden = c.hidden_size;
  const bool grouped_in =
      cpu && c.q_lora_rank > 0 && Grouped(w.q_a_proj, rows) && Grouped(w.kv_a_proj, rows);
  if (c.q_lora_rank > 0) {
    SPLITMOE_ASSIGN_OR_RETURN(float* qa, scratch.Get(rows * c.q_lora_rank));
    if (grouped_in) {  // both down-projections of x in one pass
      const kernels::LinearTask both[] = {Task(x, hidden, rows, w.q_a_proj, qa, c.q_lora_rank),
                                          Task(x, hidden, rows, w.kv_a_proj, kv, lat)};
      SPLITMOE_RETURN_IF_ERROR(kernels::GroupedLinear(both));
    } else {
      SPLITMOE_RETURN_IF_ERROR(Lin(x, rows, w.q_a_proj, qa));
    }
    SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
        device_, {qa, rows, c.q_lora_rank, 0, Vec(w.q_a_norm), eps, qa, 0}));
    SPLITMOE_RETURN_IF_ERROR(Lin(qa, rows, w.q_b_proj, q));
  } else {
    SPLITMOE_RETURN_IF_ERROR(Lin(x, rows, w.q_proj, q));
  }
  if (!grouped_in) SPLITMOE_RETURN_IF_ERROR(Lin(x, rows, w.kv_a_proj, kv));
  // The cached latents, every row at once: c_kv normalised, k_pe rotated; then into each
  // chunk's cache at its positions.
  SPLITMOE_RETURN_IF_ERROR(
      kernels::RmsNorm(device_, {kv, rows, kvr, lat, Vec(w.kv_a_norm), eps, kv, lat}));
  SPLITMOE_RETURN_IF_ERROR(
      kernels::Rope(device_, {kv, rows, 1, lat, kvr, dr, pass.device_positions, inv_freq}));
  int64_t row = 0;
  for (const SequenceChunk& chunk : batch) {
    const int64_t n = static_cast<int64_t>(chunk.tokens.size());
    SPLITMOE_RETURN_IF_ERROR(
        chunk.cache->Store(device_, cache_layer, StartOf(chunk), kv + row * lat, n));
    row += n;
  }
  // The queries' rope part, every row and head at once.
  SPLITMOE_RETURN_IF_ERROR(
      kernels::Rope(device_, {q, rows, heads, qk, dn, dr, pass.device_positions, inv_freq}));

  // kv_b_proj [heads * (dn + dv), kvr]: per head W_UK (dn rows) then W_UV (dv rows).
  const model::Matrix& kvb = w.kv_b_proj;
  const float* kvb_device =
      cpu ? nullptr : static_cast<const float*>(on_device_->Find(kvb).data);

  // Attention into o [rows, heads, dv], each chunk in the form asked for (kAuto: the cheaper
  // one for that chunk, ExpandedAttentionIsCheaper; a device runs the absorbed form only).
  // Rows of expanded chunks that the absorbed pass also computes (a batch with both) are
  // overwritten by the expanded pass after it.
  std::vector<char> expanded(batch.size(), 0);
  int64_t expanded_rows = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    expanded[i] = cpu && (form == AttentionForm::kNaive ||
                          (form == AttentionForm::kAuto &&
                           ExpandedAttentionIsCheaper(c, n, StartOf(batch[i]))));
    if (expanded[i]) expanded_rows += n;
  }
  SPLITMOE_ASSIGN_OR_RETURN(float* o, scratch.Get(rows * heads * dv));
  if (expanded_rows < rows) {
    // qf [rows, heads, lat] = [q_nope @ W_UK[h], q_pe], every row of the batch at once.
    SPLITMOE_ASSIGN_OR_RETURN(float* qf, scratch.Get(rows * heads * lat));
    using Kind = kernels::MlaProjectParams::Kind;
    SPLITMOE_RETURN_IF_ERROR(kernels::MlaProject(
        device_, {Kind::kAbsorbQuery, q, rows, heads, dn, dr, dv, &kvb, kvb_device, qf}));
    // One batched call over every sequence's latents, read in place.
    std::vector<kernels::MlaSequence> sequences;
    sequences.reserve(batch.size());
    SequenceCache::PoolRef pool;
    row = 0;
    for (const SequenceChunk& chunk : batch) {
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      const int64_t start = StartOf(chunk);
      if (n > 0 && !expanded[static_cast<size_t>(&chunk - batch.data())]) {
        sequences.push_back({chunk.cache->View(cache_layer, start + n), row, n, start});
        if (pool.pool == nullptr) pool = chunk.cache->Pool(cache_layer);
      }
      row += n;
    }
    SPLITMOE_ASSIGN_OR_RETURN(float* olat, scratch.Get(rows * heads * kvr));
    kernels::MlaAttentionParams params;
    params.heads = heads;
    params.kv_lora_rank = kvr;
    params.rope_dim = dr;
    params.softmax_scale = softmax_scale_;
    params.q = qf;
    params.out = olat;
    params.sequences = sequences;
    params.pool = pool.pool;
    params.pool_blocks = pool.blocks;
    params.pool_block_stride = pool.block_stride;
    SPLITMOE_RETURN_IF_ERROR(kernels::MlaAttention(device_, params));
    SPLITMOE_RETURN_IF_ERROR(kernels::MlaProject(
        device_, {Kind::kApplyValue, olat, rows, heads, dn, dr, dv, &kvb, kvb_device, o}));
  }
  if (expanded_rows > 0) {
    // The expanded form (CPU), chunk by chunk, the heads side by side (one per thread at a
    // time): head h's keys and values for every cached position, kvh [keys, dn + dv] =
    // c_kv @ [W_UK[h]; W_UV[h]]^T, then its queries in tiles of kQueryTile rows, each against
    // only the keys it may see (causal), as two GEMMs (scores, then values). Nothing of another
    // head is held: a thread's buffers are one head's keys and one tile's scores.
    row = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      const SequenceChunk& chunk = batch[i];
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      const int64_t start = StartOf(chunk);
      const int64_t keys = start + n;
      if (n == 0 || !expanded[i]) {
        row += n;
        continue;
      }
      const float* latents = chunk.cache->LayerRows(cache_layer, keys);  // [keys, lat]
      const float* qc = q + row * heads * qk;
      float* oc = o + row * heads * dv;
      kernels::ParallelFor(heads, [&](int64_t h) {
        ExpandedScratch& scratch = ThreadExpandedScratch();
        scratch.kv.resize(static_cast<size_t>(std::max<int64_t>(
            static_cast<int64_t>(scratch.kv.size()), keys * (dn + dv))));
        float* kvh = scratch.kv.data();
        kernels::Gemm(false, true, keys, dn + dv, kvr, 1.0f, latents, lat,
                      kernels::WidenedRows(kvb, h * (dn + dv), dn + dv), kvr, 0.0f, kvh, dn + dv);
        for (int64_t t0 = 0; t0 < n; t0 += kQueryTile) {
          const int64_t tn = std::min(kQueryTile, n - t0), seen = start + t0 + tn;
          scratch.scores.resize(static_cast<size_t>(std::max<int64_t>(
              static_cast<int64_t>(scratch.scores.size()), tn * seen)));
          float* sc = scratch.scores.data();
          const float* qt = qc + t0 * heads * qk + h * qk;
          kernels::Gemm(false, true, tn, seen, dn, softmax_scale_, qt, heads * qk, kvh, dn + dv,
                        0.0f, sc, seen);
          kernels::Gemm(false, true, tn, seen, dr, softmax_scale_, qt + dn, heads * qk,
                        latents + kvr, lat, 1.0f, sc, seen);
          for (int64_t t = 0; t < tn; ++t) {
            const int64_t valid = start + t0 + t + 1;
            kernels::SoftmaxInPlace(sc + t * seen, valid);
            std::fill(sc + t * seen + valid, sc + (t + 1) * seen, 0.0f);
          }
          kernels::Gemm(false, false, tn, dv, seen, 1.0f, sc, seen, kvh + dn, dn + dv, 0.0f,
                        oc + t0 * heads * dv + h * dv, heads * dv);
        }
      });
      row += n;
    }
  }
  return Lin(o, rows, w.o_proj, out);
}

absl::Status Transformer::Block(const model::LayerWeights& w, int64_t layer_index,
                                int64_t cache_layer, absl::Span<const SequenceChunk> batch,
                                AttentionForm form, const Pass& pass, float* h, int64_t rows,
                                const LayerOrder* order) {
  const model::ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  Scratch scratch(device_);
  SPLITMOE_ASSIGN_OR_RETURN(float* xn, scratch.Get(rows * hidden));
  SPLITMOE_ASSIGN_OR_RETURN(float* delta, scratch.Get(rows * hidden));
  SPLITMOE_RETURN_IF_ERROR(
      kernels::RmsNorm(device_, {h, rows, hidden, 0, Vec(w.input_norm), eps, xn, 0}));
  if (order != nullptr) SPLITMOE_RETURN_IF_ERROR(order->before_attention(layer_index));
  SPLITMOE_RETURN_IF_ERROR(Attention(w.attn, xn, cache_layer, batch, form, pass, delta, rows));
  if (order != nullptr) order->after_attention(layer_index);
  SPLITMOE_RETURN_IF_ERROR(kernels::Add(device_, {h, delta, rows * hidden}));
  SPLITMOE_RETURN_IF_ERROR(
      kernels::RmsNorm(device_, {h, rows, hidden, 0, Vec(w.post_attention_norm), eps, xn, 0}));
  if (!w.is_moe) {
    SPLITMOE_RETURN_IF_ERROR(Mlp(w.dense, xn, rows, delta));
  } else {
    // The gate's scores (softmax or sigmoid, before any bias), then the routed experts start;
    // the shared experts compute while they work.
    SPLITMOE_ASSIGN_OR_RETURN(float* scores, scratch.Get(rows * c.n_routed_experts));
    SPLITMOE_RETURN_IF_ERROR(Lin(xn, rows, w.gate, scores));
    SPLITMOE_RETURN_IF_ERROR(kernels::Scores(
        device_, {scores, rows, c.n_routed_experts,
                  c.scoring_func == model::ScoringFunc::kSigmoid}));
    std::unique_ptr<MoeExecutor::Pending> routed =
        moe_->Start(layer_index, xn, scores, rows, delta);
    float* shared = nullptr;
    if (c.n_shared_experts > 0) {
      absl::StatusOr<float*> buffer = scratch.Get(rows * hidden);
      absl::Status st = buffer.status();
      if (st.ok()) st = Mlp(w.shared, xn, rows, shared = *buffer);
      if (!st.ok()) {
        (void)routed->Wait();  // never leave the routed experts running on our buffers
        return st;
      }
    }
    SPLITMOE_RETURN_IF_ERROR(Annotate(routed->Wait(), absl::StrCat("MoE layer ", layer_index)));
    if (shared != nullptr) {
      SPLITMOE_RETURN_IF_ERROR(kernels::Add(device_, {delta, shared, rows * hidden}));
    }
  }
  return kernels::Add(device_, {h, delta, rows * hidden});
}

absl::Status Transformer::Forward(absl::Span<const SequenceChunk> batch, AttentionForm form,
                                  std::vector<float>* hidden_out, const LayerDoneFn& on_layer_done,
                                  const LayerOrder* order) {
  const model::ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size;
  const int64_t rows = TotalRows(batch);
  Pass pass(device_);
  SPLITMOE_RETURN_IF_ERROR(BeginPass(batch, /*mtp=*/false, &pass));
  hidden_out->assign(static_cast<size_t>(rows * hidden), 0.0f);
  float* h = hidden_out->data();
  if (!OnCpu(device_)) {
    SPLITMOE_ASSIGN_OR_RETURN(h, pass.scratch.Get(rows * hidden));
  }
  const float* table = OnCpu(device_) ? nullptr
                                      : static_cast<const float*>(on_device_->Find(weights_.embed).data);
  SPLITMOE_RETURN_IF_ERROR(
      kernels::Embed(device_, {pass.device_tokens, rows, &weights_.embed, table, h}));
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    SPLITMOE_RETURN_IF_ERROR(Block(weights_.layers[static_cast<size_t>(layer)], layer, layer, batch,
                                   form, pass, h, rows, order));
    if (on_layer_done) SPLITMOE_RETURN_IF_ERROR(on_layer_done(layer));
  }
  for (const SequenceChunk& chunk : batch) {
    chunk.cache->Commit(std::max(chunk.cache->length(),
                                 StartOf(chunk) + static_cast<int64_t>(chunk.tokens.size())));
  }
  SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
      device_, {h, rows, hidden, 0, Vec(weights_.final_norm), static_cast<float>(c.rms_norm_eps),
                h, 0}));
  if (OnCpu(device_)) return absl::OkStatus();
  return kernels::CopyToHost(device_, hidden_out->data(), h,
                             static_cast<size_t>(rows * hidden) * sizeof(float));
}

absl::Status Transformer::Logits(const float* hidden, int64_t rows, float* logits) {
  if (OnCpu(device_)) {
    kernels::Linear(hidden, rows, weights_.lm_head, logits);
    return absl::OkStatus();
  }
  const int64_t dim = config_.hidden_size, vocab = weights_.lm_head.rows;
  Scratch scratch(device_);
  SPLITMOE_ASSIGN_OR_RETURN(float* x, scratch.Get(rows * dim));
  SPLITMOE_ASSIGN_OR_RETURN(float* y, scratch.Get(rows * vocab));
  SPLITMOE_RETURN_IF_ERROR(
      kernels::CopyToDevice(device_, x, hidden, static_cast<size_t>(rows * dim) * sizeof(float)));
  SPLITMOE_RETURN_IF_ERROR(Lin(x, rows, weights_.lm_head, y));
  return kernels::CopyToHost(device_, logits, y,
                             static_cast<size_t>(rows * vocab) * sizeof(float));
}

absl::Status Transformer::MtpForward(int64_t k, absl::Span<const SequenceChunk> batch,
                                     const float* main_hidden, AttentionForm form,
                                     std::vector<float>* mtp_logits,
                                     std::vector<float>* block_hidden) {
  if (k < 0 || k >= mtp_modules()) {
    return absl::FailedPreconditionError(
        absl::StrCat("MTP module ", k, " is not loaded (", mtp_modules(), " present)"));
  }
  const model::MtpWeights& m = weights_.mtp[static_cast<size_t>(k)];
  const model::ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size, rows = TotalRows(batch);
  const float eps = static_cast<float>(c.rms_norm_eps);
  const bool cpu = OnCpu(device_);
  Pass pass(device_);
  SPLITMOE_RETURN_IF_ERROR(BeginPass(batch, /*mtp=*/true, &pass));
  // cat [rows, 2 * hidden] = [enorm(embed(next token)), hnorm(main hidden state)].
  Scratch& scratch = pass.scratch;
  SPLITMOE_ASSIGN_OR_RETURN(float* embedded, scratch.Get(rows * hidden));
  SPLITMOE_ASSIGN_OR_RETURN(float* cat, scratch.Get(rows * 2 * hidden));
  const float* table = cpu ? nullptr : static_cast<const float*>(on_device_->Find(m.embed).data);
  SPLITMOE_RETURN_IF_ERROR(
      kernels::Embed(device_, {pass.device_tokens, rows, &m.embed, table, embedded}));
  SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
      device_, {embedded, rows, hidden, 0, Vec(m.enorm), eps, cat, 2 * hidden}));
  const float* main = main_hidden;
  if (!cpu) {
    SPLITMOE_ASSIGN_OR_RETURN(float* on, scratch.Get(rows * hidden));
    SPLITMOE_RETURN_IF_ERROR(kernels::CopyToDevice(
        device_, on, main_hidden, static_cast<size_t>(rows * hidden) * sizeof(float)));
    main = on;
  }
  SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
      device_, {main, rows, hidden, 0, Vec(m.hnorm), eps, cat + hidden, 2 * hidden}));
  SPLITMOE_ASSIGN_OR_RETURN(float* h, scratch.Get(rows * hidden));
  SPLITMOE_RETURN_IF_ERROR(Lin(cat, rows, m.eh_proj, h));
  SPLITMOE_RETURN_IF_ERROR(
      Block(m.block, c.num_hidden_layers + k, 0, batch, form, pass, h, rows));
  for (const SequenceChunk& chunk : batch) {
    chunk.cache->Commit(chunk.cache->length() + static_cast<int64_t>(chunk.tokens.size()));
  }
  const size_t hidden_bytes = static_cast<size_t>(rows * hidden) * sizeof(float);
  if (block_hidden != nullptr) {
    block_hidden->resize(static_cast<size_t>(rows * hidden));
    SPLITMOE_RETURN_IF_ERROR(kernels::CopyToHost(device_, block_hidden->data(), h, hidden_bytes));
  }
  if (mtp_logits == nullptr) return kernels::Synchronize(device_);
  SPLITMOE_RETURN_IF_ERROR(
      kernels::RmsNorm(device_, {h, rows, hidden, 0, Vec(m.head_norm), eps, h, 0}));
  mtp_logits->resize(static_cast<size_t>(rows * c.vocab_size));
  if (cpu) return Lin(h, rows, m.head, mtp_logits->data());
  SPLITMOE_ASSIGN_OR_RETURN(float* y, scratch.Get(rows * c.vocab_size));
  SPLITMOE_RETURN_IF_ERROR(Lin(h, rows, m.head, y));
  return kernels::CopyToHost(device_, mtp_logits->data(), y,
                             mtp_logits->size() * sizeof(float));
}

}  // namespace splitmoe::engine
