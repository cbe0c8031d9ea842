// LatentPool: the latent caches of many sequences on one device, in the FlashMLA layout: per
// layer one pool [blocks, block_tokens, latent_dim] of fp32 or BF16, and one free list of block
// ids for all layers (a sequence's block b holds the same positions in every layer).
// PooledSequenceCache: one sequence's blocks of a pool, as the SequenceCache a Transformer
// reads and writes: rows are stored with kernels::StoreLatents through the sequence's block
// table, and attention reads them in place from the pool (kernels::MlaAttention). The same code
// runs on every backend: on a GPU it is the device-resident cache; on the CPU it runs in host
// memory, which is how the tests check it without a GPU. Not thread-safe: one owner (the
// engine or the worker whose sequences these are; the pool's free list takes a lock).
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto pool, LatentPool::Create(device, {.layers = 61,
//                                 .latent_dim = 576, .blocks = 4096}));
//   PooledSequenceCache cache(pool.get());
//   std::vector<SequenceChunk> batch = {{prompt, &cache}};
#ifndef SPLITMOE_COMMON_ENGINE_POOLED_LATENT_CACHE_H_
#define SPLITMOE_COMMON_ENGINE_POOLED_LATENT_CACHE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/engine/latent_cache.h"
#include "common/kernels/ops.h"

namespace splitmoe::engine {

struct LatentPoolOptions {
  int64_t layers = 0;
  int64_t latent_dim = 0;
  int64_t blocks = 0;  // per layer
  int64_t block_tokens = 64;
  kernels::LatentStorage dtype = kernels::LatentStorage::kFloat32;
};

class LatentPool {
 public:
  static absl::StatusOr<std::unique_ptr<LatentPool>> Create(const kernels::Device& device,
                                                            const LatentPoolOptions& options);

  const kernels::Device& device() const { return device_; }
  const LatentPoolOptions& options() const { return options_; }
  void* layer(int64_t l) const { return layers_[static_cast<size_t>(l)].data(); }
  int64_t free_blocks() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(free_.size());
  }
  // Device bytes of every layer's pool.
  uint64_t bytes() const;
  // `n` blocks off the free list, or ResourceExhausted (and none taken).
  absl::StatusOr<std::vector<int32_t>> Take(int64_t n);
  void Give(absl::Span<const int32_t> ids);

 private:
  LatentPool(const kernels::Device& device, const LatentPoolOptions& options)
      : device_(device), options_(options) {}
  kernels::Device device_;
  LatentPoolOptions options_;
  std::vector<kernels::DeviceBuffer> layers_;
  mutable std::mutex mu_;      // Take and Give may come from different threads (a worker's
                               // executor computes with caches its actor drops)
  std::vector<int32_t> free_;  // taken from the back: low ids first; guarded by mu_
};

// A sequence's block ids in a device's memory (what kernels::StoreLatents reads), copied when
// they change, with room to double so a decoding sequence re-allocates O(log n) times. After a
// failed Set it names no block (size 0) rather than stale ones.
class DeviceBlockTable {
 public:
  absl::Status Set(const kernels::Device& device, absl::Span<const int32_t> blocks);
  const int32_t* data() const { return buffer_.as<const int32_t>(); }
  int64_t size() const { return size_; }

 private:
  kernels::DeviceBuffer buffer_;
  int64_t size_ = 0;
  int64_t capacity_ = 0;
};

class PooledSequenceCache : public SequenceCache {
 public:
  // `layer_offset`: layer l of this cache is layer l + layer_offset of the pool, and the cache
  // has `layers` of them (0: the pool's layers from the offset on).
  explicit PooledSequenceCache(LatentPool* pool, int64_t layer_offset = 0, int64_t layers = 0);
  ~PooledSequenceCache() override;
  PooledSequenceCache(const PooledSequenceCache&) = delete;
  PooledSequenceCache& operator=(const PooledSequenceCache&) = delete;

  int64_t latent_dim() const override { return pool_->options().latent_dim; }
  int64_t length() const override { return length_; }
  // Takes blocks from the pool until `tokens` fit (ResourceExhausted when it has too few), and
  // puts the sequence's block table on the device.
  absl::Status Reserve(int64_t tokens) override;
  // Null: the rows live in the pool, in its dtype and memory (Store writes them).
  float* Row(int64_t layer, int64_t position) override { return nullptr; }
  absl::Status Store(const kernels::Device& device, int64_t layer, int64_t start,
                     const float* rows, int64_t n) override;
  absl::Status ReadRows(int64_t layer, int64_t first, int64_t n, float* out) override;
  absl::Status WriteRows(int64_t layer, int64_t first, const float* rows, int64_t n) override;
  kernels::LatentBlocks View(int64_t layer, int64_t keys) override;
  PoolRef Pool(int64_t layer) const override;
  // On the CPU, rows [0, keys) gathered (widened from BF16) into one fp32 array; on a device,
  // null: a Transformer there attends in the absorbed form, over View.
  const float* LayerRows(int64_t layer, int64_t keys) override;
  void Commit(int64_t new_length) override { length_ = new_length; }
  void Truncate(int64_t length) override { length_ = std::min(length_, length); }

  int64_t reserved_tokens() const {
    return static_cast<int64_t>(blocks_.size()) * pool_->options().block_tokens;
  }
  const std::vector<int32_t>& blocks() const { return blocks_; }

 private:
  int64_t PoolLayer(int64_t layer) const { return layer + layer_offset_; }

  LatentPool* pool_;
  int64_t layer_offset_;
  int64_t layers_;
  int64_t length_ = 0;
  std::vector<int32_t> blocks_;   // the sequence's blocks, in position order
  DeviceBlockTable table_;        // blocks_ in the pool's device memory
  std::vector<float> gathered_;   // LayerRows on the CPU
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_POOLED_LATENT_CACHE_H_
