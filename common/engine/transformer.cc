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

absl::Status LocalMoeExecutor::Compute(int64_t layer, const float* x, const float* scores,
                                       int64_t rows, float* out) {
  const model::LayerWeights& w =
      layer < config_.num_hidden_layers
          ? weights_.layers[static_cast<size_t>(layer)]
          : weights_.mtp[static_cast<size_t>(layer - config_.num_hidden_layers)].block;
  const int64_t k = config_.num_experts_per_tok;
  std::vector<int32_t> experts(static_cast<size_t>(rows * k));
  std::vector<float> weights(static_cast<size_t>(rows * k));
  const kernels::Device cpu;
  SPLITMOE_RETURN_IF_ERROR(kernels::SelectExperts(
      cpu, {&config_, scores, w.gate_bias.empty() ? nullptr : w.gate_bias.data(), rows,
            experts.data(), weights.data()}));
  const std::vector<const model::MlpWeights*> held = w.HeldExperts();
  kernels::RoutedExpertsParams p;
  p.x = x;
  p.tokens = rows;
  p.hidden = config_.hidden_size;
  p.inter = config_.moe_intermediate_size;
  p.top_k = k;
  p.experts = experts.data();
  p.weights = weights.data();
  p.host = held;
  p.out = out;
  return Annotate(kernels::RoutedExperts(cpu, p), absl::StrCat("layer ", layer, " in this process"));
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

Transformer::Transformer(const model::ModelConfig& config, const model::ModelWeights& weights,
                         MoeExecutor* moe)
    : config_(config),
      weights_(weights),
      moe_(moe),
      rope_(config),
      softmax_scale_(static_cast<float>(config.SoftmaxScale())) {}

absl::Status Transformer::Mlp(const model::MlpWeights& w, const float* x, int64_t rows,
                              float* out) {
  const int64_t inter = w.gate.rows, hidden = w.gate.cols;
  std::vector<float> g(static_cast<size_t>(rows * inter)), u(static_cast<size_t>(rows * inter));
  if (Grouped(w.gate, rows) && Grouped(w.up, rows)) {
    const kernels::LinearTask both[] = {Task(x, hidden, rows, w.gate, g.data(), inter),
                                        Task(x, hidden, rows, w.up, u.data(), inter)};
    SPLITMOE_RETURN_IF_ERROR(kernels::GroupedLinear(both));
  } else {
    kernels::Linear(x, rows, w.gate, g.data());
    kernels::Linear(x, rows, w.up, u.data());
  }
  SPLITMOE_RETURN_IF_ERROR(kernels::SwiGlu(device_, {g.data(), u.data(), rows * inter}));
  kernels::Linear(g.data(), rows, w.down, out);
  return absl::OkStatus();
}

absl::Status Transformer::Attention(const model::AttentionWeights& w, const float* x,
                                    int64_t cache_layer, absl::Span<const SequenceChunk> batch,
                                    AttentionForm form, float* out, int64_t rows) {
  const model::ModelConfig& c = config_;
  const int64_t heads = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  const int64_t dv = c.v_head_dim, kvr = c.kv_lora_rank, qk = c.qk_head_dim(), lat = c.latent_dim();

  // Queries q [rows, heads, qk].
  std::vector<float> q(static_cast<size_t>(rows * heads * qk));
  // Latents: kv [rows, kv_lora_rank + rope] -> cache rows (normalised c_kv, rotated k_pe).
  std::vector<float> kv(static_cast<size_t>(rows * lat));
  const int64_t hidden = c.hidden_size;
  const bool grouped_in = c.q_lora_rank > 0 && Grouped(w.q_a_proj, rows) && Grouped(w.kv_a_proj, rows);
  if (c.q_lora_rank > 0) {
    std::vector<float> qa(static_cast<size_t>(rows * c.q_lora_rank));
    if (grouped_in) {  // both down-projections of x in one pass
      const kernels::LinearTask both[] = {
          Task(x, hidden, rows, w.q_a_proj, qa.data(), c.q_lora_rank),
          Task(x, hidden, rows, w.kv_a_proj, kv.data(), lat)};
      SPLITMOE_RETURN_IF_ERROR(kernels::GroupedLinear(both));
    } else {
      kernels::Linear(x, rows, w.q_a_proj, qa.data());
    }
    SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
        device_, {qa.data(), rows, c.q_lora_rank, 0, w.q_a_norm.data(),
                  static_cast<float>(c.rms_norm_eps), qa.data(), 0}));
    kernels::Linear(qa.data(), rows, w.q_b_proj, q.data());
  } else {
    kernels::Linear(x, rows, w.q_proj, q.data());
  }
  if (!grouped_in) kernels::Linear(x, rows, w.kv_a_proj, kv.data());
  std::vector<int32_t> positions(static_cast<size_t>(rows));
  int64_t row = 0;
  for (const SequenceChunk& chunk : batch) {
    const int64_t start = StartOf(chunk);
    for (int64_t i = 0; i < static_cast<int64_t>(chunk.tokens.size()); ++i, ++row) {
      positions[static_cast<size_t>(row)] = static_cast<int32_t>(start + i);
      float* cached = chunk.cache->Row(cache_layer, start + i);
      const float* kvr_row = kv.data() + row * lat;
      SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
          device_, {kvr_row, 1, kvr, 0, w.kv_a_norm.data(), static_cast<float>(c.rms_norm_eps),
                    cached, 0}));
      std::memcpy(cached + kvr, kvr_row + kvr, dr * sizeof(float));
      SPLITMOE_RETURN_IF_ERROR(kernels::Rope(
          device_, {cached, 1, 1, lat, kvr, dr, &positions[static_cast<size_t>(row)],
                    rope_.inv_freq().data()}));
    }
    chunk.cache->RowsWritten(cache_layer);
  }
  // The queries' rope part, every row and head at once.
  SPLITMOE_RETURN_IF_ERROR(kernels::Rope(
      device_, {q.data(), rows, heads, qk, dn, dr, positions.data(), rope_.inv_freq().data()}));

  // kv_b_proj [heads * (dn + dv), kvr]: per head W_UK (dn rows) then W_UV (dv rows).
  const model::Matrix& kvb = w.kv_b_proj;

  // Attention into o [rows, heads, dv], each chunk in the form asked for (kAuto: the cheaper
  // one for that chunk, ExpandedAttentionIsCheaper). Rows of expanded chunks that the absorbed pass
  // also computes (a batch with both) are overwritten by the expanded pass after it.
  std::vector<char> expanded(batch.size(), 0);
  int64_t expanded_rows = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    expanded[i] = form == AttentionForm::kNaive ||
                  (form == AttentionForm::kAuto && ExpandedAttentionIsCheaper(c, n, StartOf(batch[i])));
    if (expanded[i]) expanded_rows += n;
  }
  std::vector<float> o(static_cast<size_t>(rows * heads * dv));
  if (expanded_rows < rows) {
    // qf [rows, heads, lat] = [q_nope @ W_UK[h], q_pe], every row of the batch at once.
    std::vector<float> qf(static_cast<size_t>(rows * heads * lat));
    using Kind = kernels::MlaProjectParams::Kind;
    SPLITMOE_RETURN_IF_ERROR(kernels::MlaProject(
        device_, {Kind::kAbsorbQuery, q.data(), rows, heads, dn, dr, dv, &kvb, nullptr, qf.data()}));
    // One batched call over every sequence's latents, read in place.
    std::vector<kernels::MlaSequence> sequences;
    sequences.reserve(batch.size());
    row = 0;
    for (const SequenceChunk& chunk : batch) {
      const int64_t n = static_cast<int64_t>(chunk.tokens.size());
      const int64_t start = StartOf(chunk);
      if (n > 0 && !expanded[static_cast<size_t>(&chunk - batch.data())]) {
        sequences.push_back({chunk.cache->View(cache_layer, start + n), row, n, start});
      }
      row += n;
    }
    std::vector<float> olat(static_cast<size_t>(rows * heads * kvr));
    kernels::MlaAttentionParams params;
    params.heads = heads;
    params.kv_lora_rank = kvr;
    params.rope_dim = dr;
    params.softmax_scale = softmax_scale_;
    params.q = qf.data();
    params.out = olat.data();
    params.sequences = sequences;
    SPLITMOE_RETURN_IF_ERROR(kernels::MlaAttention(device_, params));
    SPLITMOE_RETURN_IF_ERROR(kernels::MlaProject(
        device_,
        {Kind::kApplyValue, olat.data(), rows, heads, dn, dr, dv, &kvb, nullptr, o.data()}));
  }
  if (expanded_rows > 0) {
    // The expanded form, chunk by chunk, the heads side by side (one per thread at a time):
    // head h's keys and values for every cached position, kvh [keys, dn + dv] =
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
      const float* qc = q.data() + row * heads * qk;
      float* oc = o.data() + row * heads * dv;
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
  kernels::Linear(o.data(), rows, w.o_proj, out);
  return absl::OkStatus();
}

absl::Status Transformer::Block(const model::LayerWeights& w, int64_t layer_index,
                                int64_t cache_layer, absl::Span<const SequenceChunk> batch,
                                AttentionForm form, float* h, int64_t rows,
                                const LayerOrder* order) {
  const model::ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  std::vector<float> xn(static_cast<size_t>(rows * hidden)),
      delta(static_cast<size_t>(rows * hidden));
  SPLITMOE_RETURN_IF_ERROR(
      kernels::RmsNorm(device_, {h, rows, hidden, 0, w.input_norm.data(), eps, xn.data(), 0}));
  if (order != nullptr) SPLITMOE_RETURN_IF_ERROR(order->before_attention(layer_index));
  SPLITMOE_RETURN_IF_ERROR(
      Attention(w.attn, xn.data(), cache_layer, batch, form, delta.data(), rows));
  if (order != nullptr) order->after_attention(layer_index);
  SPLITMOE_RETURN_IF_ERROR(kernels::Add(device_, {h, delta.data(), rows * hidden}));
  SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
      device_, {h, rows, hidden, 0, w.post_attention_norm.data(), eps, xn.data(), 0}));
  if (!w.is_moe) {
    SPLITMOE_RETURN_IF_ERROR(Mlp(w.dense, xn.data(), rows, delta.data()));
  } else {
    std::vector<float> scores(static_cast<size_t>(rows * c.n_routed_experts));
    GateScores(c, xn.data(), rows, w.gate, scores.data());
    // The routed experts start first; the shared experts compute while they work.
    std::unique_ptr<MoeExecutor::Pending> routed =
        moe_->Start(layer_index, xn.data(), scores.data(), rows, delta.data());
    std::vector<float> shared;
    if (c.n_shared_experts > 0) {
      shared.resize(static_cast<size_t>(rows * hidden));
      absl::Status st = Mlp(w.shared, xn.data(), rows, shared.data());
      if (!st.ok()) {
        (void)routed->Wait();  // never leave the routed experts running on our buffers
        return st;
      }
    }
    SPLITMOE_RETURN_IF_ERROR(Annotate(routed->Wait(), absl::StrCat("MoE layer ", layer_index)));
    if (!shared.empty()) {
      SPLITMOE_RETURN_IF_ERROR(kernels::Add(device_, {delta.data(), shared.data(), rows * hidden}));
    }
  }
  return kernels::Add(device_, {h, delta.data(), rows * hidden});
}

absl::Status Transformer::Forward(absl::Span<const SequenceChunk> batch, AttentionForm form,
                                  std::vector<float>* hidden_out, const LayerDoneFn& on_layer_done,
                                  const LayerOrder* order) {
  const model::ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size;
  const int64_t rows = TotalRows(batch);
  for (const SequenceChunk& chunk : batch) {
    for (int32_t t : chunk.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t end = StartOf(chunk) + static_cast<int64_t>(chunk.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence of ", end,
                                                     " tokens exceeds max_position_embeddings ",
                                                     c.max_position_embeddings));
    }
    SPLITMOE_RETURN_IF_ERROR(chunk.cache->Reserve(end));
  }
  std::vector<float>& h = *hidden_out;
  h.assign(static_cast<size_t>(rows * hidden), 0.0f);
  int64_t row = 0;
  for (const SequenceChunk& chunk : batch) {
    const auto n = static_cast<int64_t>(chunk.tokens.size());
    SPLITMOE_RETURN_IF_ERROR(kernels::Embed(
        device_, {chunk.tokens.data(), n, &weights_.embed, nullptr, h.data() + row * hidden}));
    row += n;
  }
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    SPLITMOE_RETURN_IF_ERROR(Block(weights_.layers[static_cast<size_t>(layer)], layer, layer, batch,
                                   form, h.data(), rows, order));
    if (on_layer_done) SPLITMOE_RETURN_IF_ERROR(on_layer_done(layer));
  }
  for (const SequenceChunk& chunk : batch) {
    chunk.cache->Commit(std::max(chunk.cache->length(),
                                 StartOf(chunk) + static_cast<int64_t>(chunk.tokens.size())));
  }
  SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
      device_, {h.data(), rows, hidden, 0, weights_.final_norm.data(),
                static_cast<float>(c.rms_norm_eps), h.data(), 0}));
  return absl::OkStatus();
}

void Transformer::Logits(const float* hidden, int64_t rows, float* logits) const {
  kernels::Linear(hidden, rows, weights_.lm_head, logits);
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
  std::vector<float> cat(static_cast<size_t>(rows * 2 * hidden));
  int64_t row = 0;
  for (const SequenceChunk& chunk : batch) {
    SPLITMOE_RETURN_IF_ERROR(
        chunk.cache->Reserve(chunk.cache->length() + static_cast<int64_t>(chunk.tokens.size())));
    for (int32_t t : chunk.tokens) {
      if (t < 0 || t >= c.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " outside the vocabulary"));
      SPLITMOE_RETURN_IF_ERROR(
          kernels::Embed(device_, {&t, 1, &m.embed, nullptr, &cat[row * 2 * hidden]}));
      SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
          device_, {&cat[row * 2 * hidden], 1, hidden, 0, m.enorm.data(), eps,
                    &cat[row * 2 * hidden], 0}));
      SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
          device_, {main_hidden + row * hidden, 1, hidden, 0, m.hnorm.data(), eps,
                    &cat[row * 2 * hidden + hidden], 0}));
      ++row;
    }
  }
  std::vector<float> h(static_cast<size_t>(rows * hidden));
  kernels::Linear(cat.data(), rows, m.eh_proj, h.data());
  SPLITMOE_RETURN_IF_ERROR(Block(m.block, c.num_hidden_layers + k, 0, batch, form, h.data(), rows));
  for (const SequenceChunk& chunk : batch) {
    chunk.cache->Commit(chunk.cache->length() + static_cast<int64_t>(chunk.tokens.size()));
  }
  if (block_hidden != nullptr) *block_hidden = h;
  if (mtp_logits == nullptr) return absl::OkStatus();
  SPLITMOE_RETURN_IF_ERROR(kernels::RmsNorm(
      device_, {h.data(), rows, hidden, 0, m.head_norm.data(), eps, h.data(), 0}));
  mtp_logits->resize(static_cast<size_t>(rows * c.vocab_size));
  kernels::Linear(h.data(), rows, m.head, mtp_logits->data());
  return absl::OkStatus();
}

}  // namespace splitmoe::engine
