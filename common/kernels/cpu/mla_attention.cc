#include "common/kernels/cpu/mla_attention.h"

#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/kernels/cpu/threads.h"
#include "common/model/numeric.h"

namespace splitmoe::kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Scratch {
  std::vector<float> q, scores, acc, max, sum, keys;
  void Fit(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Heads [h0, h1) of one sequence.
void Attend(const MlaAttentionParams& p, const MlaSequence& seq, int64_t h0, int64_t h1) {
  const int64_t kvr = p.kv_lora_rank, lat = kvr + p.rope_dim, heads = p.heads;
  const int64_t hh = h1 - h0, rows = seq.rows * hh;  // query vectors, ordered (token, head)
  const int64_t bt = seq.latents.block_tokens;
  Scratch& s = ThreadScratch();
  s.Fit(s.q, rows * lat);
  s.Fit(s.scores, rows * bt);
  s.Fit(s.acc, rows * kvr);
  s.Fit(s.max, rows);
  s.Fit(s.sum, rows);
  const bool bf16 = seq.latents.dtype == LatentStorage::kBFloat16;
  if (bf16) s.Fit(s.keys, bt * lat);
  for (int64_t t = 0; t < seq.rows; ++t) {
    std::memcpy(&s.q[t * hh * lat], p.q + ((seq.first_row + t) * heads + h0) * lat,
                static_cast<size_t>(hh * lat) * sizeof(float));
  }
  std::fill(s.acc.begin(), s.acc.begin() + rows * kvr, 0.0f);
  std::fill(s.max.begin(), s.max.begin() + rows, kNegInf);
  std::fill(s.sum.begin(), s.sum.begin() + rows, 0.0f);
  const int64_t keys = seq.start + seq.rows;  // the last token sees them all
  for (int64_t k0 = 0, b = 0; k0 < keys; k0 += bt, ++b) {
    const int64_t nk = std::min(bt, keys - k0);
    const float* k;
    if (bf16) {
      const auto* src = static_cast<const uint16_t*>(seq.latents.blocks[static_cast<size_t>(b)]);
      for (int64_t i = 0; i < nk * lat; ++i) s.keys[i] = model::Bf16ToFloat(src[i]);
      k = s.keys.data();
    } else {
      k = static_cast<const float*>(seq.latents.blocks[static_cast<size_t>(b)]);
    }
    // scores[rows, nk] = scale * q @ k^T
    (void)dnnl_sgemm('N', 'T', rows, nk, lat, p.softmax_scale, s.q.data(), lat, k, lat, 0.0f,
                     s.scores.data(), nk);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r / hh;
      const int64_t valid = std::min(nk, seq.start + t + 1 - k0);
      float* sc = &s.scores[r * nk];
      if (valid <= 0) {
        std::fill(sc, sc + nk, 0.0f);
        continue;
      }
      float m = s.max[r];
      for (int64_t j = 0; j < valid; ++j) m = std::max(m, sc[j]);
      const float correction = std::exp(s.max[r] - m);  // 0 on the first block (max -inf)
      float sum = 0.0f;
      for (int64_t j = 0; j < valid; ++j) {
        sc[j] = std::exp(sc[j] - m);
        sum += sc[j];
      }
      std::fill(sc + valid, sc + nk, 0.0f);
      s.sum[r] = s.sum[r] * correction + sum;
      s.max[r] = m;
      if (correction != 1.0f) {
        float* a = &s.acc[r * kvr];
        for (int64_t j = 0; j < kvr; ++j) a[j] *= correction;
      }
    }
    // acc[rows, kvr] += scores[rows, nk] @ c_kv[nk, kvr]
    (void)dnnl_sgemm('N', 'N', rows, kvr, nk, 1.0f, s.scores.data(), nk, k, lat, 1.0f,
                     s.acc.data(), kvr);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r / hh, h = h0 + r % hh;
    float* o = p.out + ((seq.first_row + t) * heads + h) * kvr;
    const float inv = 1.0f / s.sum[r];
    for (int64_t j = 0; j < kvr; ++j) o[j] = s.acc[r * kvr + j] * inv;
  }
}

}  // namespace

absl::Status CheckMlaAttention(const MlaAttentionParams& p) {
  if (p.heads <= 0 || p.kv_lora_rank <= 0 || p.rope_dim < 0) {
    return absl::InvalidArgumentError(absl::StrCat("MlaAttention: heads ", p.heads,
                                                   ", kv_lora_rank ", p.kv_lora_rank,
                                                   ", rope_dim ", p.rope_dim));
  }
  if (!p.sequences.empty() && (p.q == nullptr || p.out == nullptr)) {
    return absl::InvalidArgumentError("MlaAttention: null q or out");
  }
  for (size_t i = 0; i < p.sequences.size(); ++i) {
    const MlaSequence& s = p.sequences[i];
    const LatentBlocks& l = s.latents;
    const int64_t keys = s.start + s.rows;
    if (s.rows <= 0 || s.start < 0 || s.first_row < 0) {
      return absl::InvalidArgumentError(absl::StrCat("MlaAttention: sequence ", i, " has rows ",
                                                     s.rows, ", start ", s.start));
    }
    if (l.block_tokens <= 0 || l.keys < keys ||
        static_cast<int64_t>(l.blocks.size()) * l.block_tokens < keys) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MlaAttention: sequence ", i, " attends ", keys, " keys but its latents hold ", l.keys,
          " in ", l.blocks.size(), " blocks of ", l.block_tokens));
    }
    for (int64_t b = 0; b * l.block_tokens < keys; ++b) {
      if (l.blocks[static_cast<size_t>(b)] == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("MlaAttention: sequence ", i, " block ", b, " is null"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status MlaAttention(const MlaAttentionParams& p) {
  if (absl::Status s = CheckMlaAttention(p); !s.ok()) return s;
  const int64_t n = static_cast<int64_t>(p.sequences.size());
  if (n == 0) return absl::OkStatus();
  // Split heads so that every thread has work even for one sequence; each split reads the
  // sequence's latents once more (from cache when they fit).
  const int64_t splits = std::clamp<int64_t>((CpuThreads() + n - 1) / n, 1, p.heads);
  const int64_t per = (p.heads + splits - 1) / splits;
  const int64_t items = n * splits;
#pragma omp parallel for schedule(dynamic, 1) if (items > 1)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t h0 = (i % splits) * per, h1 = std::min(p.heads, h0 + per);
    if (h0 < h1) Attend(p, p.sequences[static_cast<size_t>(i / splits)], h0, h1);
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::kernels
