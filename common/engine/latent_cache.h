// SequenceCache: what the transformer needs from a sequence's MLA cache — per token and layer
// exactly latent_dim = kv_lora_rank + qk_rope_head_dim values, the normalised c_kv followed by
// the rotated RoPE key, and nothing else (K and V are never cached). LatentCache is the
// contiguous one of the single-process engine; the decode worker's paged cache implements the
// same interface, and so does a sequence's share of a device's pool (pooled_latent_cache.h),
// which a Transformer on a GPU reads and writes. Owned by one sequence; not thread-safe.
//
//   LatentCache cache(config.num_hidden_layers, config.latent_dim());
//   float* row = cache.Row(layer, position);   // [latent_dim]
#ifndef SPLITMOE_COMMON_ENGINE_LATENT_CACHE_H_
#define SPLITMOE_COMMON_ENGINE_LATENT_CACHE_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/kernels/cpu/mla_attention.h"
#include "common/kernels/ops.h"

namespace splitmoe::engine {

class SequenceCache {
 public:
  virtual ~SequenceCache() = default;
  virtual int64_t latent_dim() const = 0;
  // Tokens whose latents are stored in every layer.
  virtual int64_t length() const = 0;
  // Makes room for `tokens` in total; may fail (ResourceExhausted) for a bounded cache.
  virtual absl::Status Reserve(int64_t tokens) = 0;
  // Write target for the latents of a token at `position` >= length(), fp32 [latent_dim] in
  // host memory; null for a cache whose rows are not host fp32 (a device's: use Store).
  virtual float* Row(int64_t layer, int64_t position) = 0;
  // Stores rows [n, latent_dim] of fp32 latents, in the memory of `device`, at positions
  // start .. start + n - 1 (>= length()) of `layer`, then RowsWritten(layer): how a forward pass
  // writes a chunk's latents. This default serves host caches (copies through Row()); a
  // device's cache stores them with kernels::StoreLatents.
  virtual absl::Status Store(const kernels::Device& device, int64_t layer, int64_t start,
                             const float* rows, int64_t n);
  // Rows [first, first + n) of `layer` (written: stored, or through Row() since) copied out to
  // host memory as fp32 [n, latent_dim], widened from the cache's dtype: what a prefill worker
  // ships. This default serves host caches (reads Row()).
  virtual absl::Status ReadRows(int64_t layer, int64_t first, int64_t n, float* out);
  // Host fp32 rows [n, latent_dim] written at positions first .. first + n - 1 of `layer` (rows
  // read back from elsewhere: a cached prefix). This default serves host caches (Store).
  virtual absl::Status WriteRows(int64_t layer, int64_t first, const float* rows, int64_t n) {
    return Store(kernels::Device{}, layer, first, rows, n);
  }
  // The pool every block of `layer` lies in, as a device's attention needs them (the FlashMLA
  // layout, kernels::MlaAttentionParams::pool): {null, 0} for a cache whose blocks lie anywhere
  // in host memory. `block_stride`: values from one block to the next (0: packed).
  struct PoolRef {
    const void* pool = nullptr;
    int64_t blocks = 0;
    int64_t block_stride = 0;
  };
  virtual PoolRef Pool(int64_t layer) const { return {}; }
  // The rows of `layer` written through Row() are complete: a cache that stages them (bf16)
  // stores them now, so View and LayerRows see them.
  virtual void RowsWritten(int64_t layer) {}
  // Rows [0, keys) of `layer` in place, as the blocks the cache keeps them in (no copy); valid
  // until the cache changes.
  virtual kernels::LatentBlocks View(int64_t layer, int64_t keys) = 0;
  // Rows [0, keys) of `layer` — stored ones and those written through Row() since — as one
  // contiguous fp32 array [keys, latent_dim], valid until the next call on this cache.
  virtual const float* LayerRows(int64_t layer, int64_t keys) = 0;
  // Every layer has been written up to `new_length`.
  virtual void Commit(int64_t new_length) = 0;
  // Forgets every row at or past `length` (<= length()), in every layer: speculative decoding
  // rolls back the rows of rejected draft tokens. The room stays reserved.
  virtual void Truncate(int64_t length) = 0;
};

class LatentCache : public SequenceCache {
 public:
  LatentCache(int64_t layers, int64_t latent_dim) : latent_dim_(latent_dim), layers_(layers) {
    per_layer_.resize(static_cast<size_t>(layers));
  }

  int64_t latent_dim() const override { return latent_dim_; }
  int64_t layers() const { return layers_; }
  int64_t length() const override { return length_; }
  void set_length(int64_t tokens) { length_ = tokens; }
  absl::Status Reserve(int64_t tokens) override {
    EnsureCapacity(tokens);
    return absl::OkStatus();
  }
  const float* LayerRows(int64_t layer, int64_t /*keys*/) override { return Layer(layer); }
  // The contiguous rows, seen as blocks of kViewBlockTokens.
  kernels::LatentBlocks View(int64_t layer, int64_t keys) override {
    kernels::LatentBlocks view;
    view.block_tokens = kViewBlockTokens;
    view.keys = keys;
    for (int64_t r = 0; r < keys; r += kViewBlockTokens) view.blocks.push_back(Row(layer, r));
    return view;
  }
  static constexpr int64_t kViewBlockTokens = 64;
  void Commit(int64_t new_length) override { length_ = new_length; }
  void Truncate(int64_t length) override { length_ = std::min(length_, length); }

  // Grows every layer to hold `tokens` rows; existing rows are kept.
  void EnsureCapacity(int64_t tokens) {
    if (tokens <= capacity_) return;
    int64_t grown = capacity_ == 0 ? 64 : capacity_;
    while (grown < tokens) grown *= 2;
    for (auto& layer : per_layer_) layer.resize(static_cast<size_t>(grown * latent_dim_));
    capacity_ = grown;
  }
  float* Row(int64_t layer, int64_t position) override {
    return per_layer_[static_cast<size_t>(layer)].data() + position * latent_dim_;
  }
  const float* Layer(int64_t layer) const { return per_layer_[static_cast<size_t>(layer)].data(); }
  // Bytes a token occupies across all layers (fp32).
  int64_t bytes_per_token() const {
    return layers_ * latent_dim_ * static_cast<int64_t>(sizeof(float));
  }

 private:
  int64_t latent_dim_;
  int64_t layers_;
  int64_t length_ = 0;
  int64_t capacity_ = 0;
  std::vector<std::vector<float>> per_layer_;  // [layers][capacity * latent_dim]
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_LATENT_CACHE_H_
