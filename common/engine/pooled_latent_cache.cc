#include "common/engine/pooled_latent_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/model/numeric.h"

namespace splitmoe::engine {
namespace {

int64_t ElementBytes(kernels::LatentStorage dtype) {
  return dtype == kernels::LatentStorage::kBFloat16 ? 2 : 4;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LatentPool>> LatentPool::Create(const kernels::Device& device,
                                                               const LatentPoolOptions& o) {
  if (o.layers <= 0 || o.latent_dim <= 0 || o.blocks <= 0 || o.block_tokens <= 0 ||
      o.blocks > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "latent pool of ", o.layers, " layers x ", o.blocks, " blocks of ", o.block_tokens,
        " tokens x ", o.latent_dim, ": every size must be > 0 (and blocks < 2^30)"));
  }
  std::unique_ptr<LatentPool> pool(new LatentPool(device, o));
  const size_t layer_bytes =
      static_cast<size_t>(o.blocks * o.block_tokens * o.latent_dim * ElementBytes(o.dtype));
  for (int64_t l = 0; l < o.layers; ++l) {
    absl::StatusOr<kernels::DeviceBuffer> buffer = kernels::Allocate(device, layer_bytes);
    if (!buffer.ok()) {
      return Annotate(buffer.status(),
                      absl::StrCat("latent pool layer ", l, " (", layer_bytes, " bytes)"));
    }
    pool->layers_.push_back(std::move(*buffer));
  }
  pool->free_.reserve(static_cast<size_t>(o.blocks));
  for (int64_t b = o.blocks - 1; b >= 0; --b) pool->free_.push_back(static_cast<int32_t>(b));
  return pool;
}

uint64_t LatentPool::bytes() const {
  uint64_t total = 0;
  for (const kernels::DeviceBuffer& b : layers_) total += b.bytes();
  return total;
}

absl::StatusOr<std::vector<int32_t>> LatentPool::Take(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t free = static_cast<int64_t>(free_.size());
  if (n < 0 || n > free) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the latent pool on ", kernels::DeviceName(device_), " has ", free, " of ",
        options_.blocks, " blocks free, ", n, " asked for"));
  }
  std::vector<int32_t> ids(free_.end() - n, free_.end());
  std::reverse(ids.begin(), ids.end());
  free_.resize(free_.size() - static_cast<size_t>(n));
  return ids;
}

void LatentPool::Give(absl::Span<const int32_t> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = ids.rbegin(); it != ids.rend(); ++it) free_.push_back(*it);
}

PooledSequenceCache::PooledSequenceCache(LatentPool* pool, int64_t layer_offset, int64_t layers)
    : pool_(pool),
      layer_offset_(layer_offset),
      layers_(layers > 0 ? layers : pool->options().layers - layer_offset) {}

PooledSequenceCache::~PooledSequenceCache() { pool_->Give(blocks_); }

absl::Status PooledSequenceCache::Reserve(int64_t tokens) {
  const int64_t bt = pool_->options().block_tokens;
  const int64_t needed = (tokens + bt - 1) / bt;
  const int64_t have = static_cast<int64_t>(blocks_.size());
  if (needed <= have && table_.size() == have) return absl::OkStatus();
  if (needed > have) {
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<int32_t> more, pool_->Take(needed - have));
    blocks_.insert(blocks_.end(), more.begin(), more.end());
  }
  absl::Status copied = table_.Set(pool_->device(), blocks_);
  if (!copied.ok()) {
    // The device's table must name exactly blocks_: give the new blocks back (a later Reserve
    // sets it again).
    pool_->Give(absl::MakeConstSpan(blocks_).subspan(static_cast<size_t>(have)));
    blocks_.resize(static_cast<size_t>(have));
  }
  return copied;
}

absl::Status DeviceBlockTable::Set(const kernels::Device& device,
                                   absl::Span<const int32_t> blocks) {
  const int64_t n = static_cast<int64_t>(blocks.size());
  size_ = 0;  // stale until the copy lands
  if (n > capacity_) {
    const int64_t capacity = std::max<int64_t>(n, 2 * capacity_);
    SPLITMOE_ASSIGN_OR_RETURN(
        buffer_, kernels::Allocate(device, static_cast<size_t>(capacity) * sizeof(int32_t)));
    capacity_ = capacity;
  }
  SPLITMOE_RETURN_IF_ERROR(
      kernels::CopyToDevice(device, buffer_.data(), blocks.data(), blocks.size() * sizeof(int32_t)));
  size_ = n;
  return absl::OkStatus();
}

absl::Status PooledSequenceCache::Store(const kernels::Device& device, int64_t layer,
                                        int64_t start, const float* rows, int64_t n) {
  const kernels::Device& own = pool_->device();
  if (device.backend != own.backend || device.index != own.index) {
    return absl::FailedPreconditionError(
        absl::StrCat("latent rows from ", kernels::DeviceName(device), " stored into a pool on ",
                     kernels::DeviceName(own)));
  }
  if (layer < 0 || layer >= layers_) {
    return absl::InvalidArgumentError(
        absl::StrCat("latent layer ", layer, " of a cache of ", layers_));
  }
  const LatentPoolOptions& o = pool_->options();
  kernels::StoreLatentsParams p;
  p.rows = rows;
  p.n = n;
  p.latent_dim = o.latent_dim;
  p.start = start;
  p.block_table = table_.data();
  p.table_blocks = table_.size();
  p.block_tokens = o.block_tokens;
  p.pool = pool_->layer(PoolLayer(layer));
  p.pool_blocks = o.blocks;
  p.dtype = o.dtype;
  // On the caller's stream: the pass that computed the rows, then the attention that reads them.
  return kernels::StoreLatents(device, p);
}

absl::Status PooledSequenceCache::ReadRows(int64_t layer, int64_t first, int64_t n, float* out) {
  const LatentPoolOptions& o = pool_->options();
  if (layer < 0 || layer >= layers_ || first < 0 || n < 0 ||
      first + n > reserved_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("rows [", first, ", ", first + n, ") of layer ",
                                                   layer, ": the cache holds ", layers_,
                                                   " layers of ", reserved_tokens(), " rows"));
  }
  const int64_t lat = o.latent_dim, elem = ElementBytes(o.dtype);
  const char* base = static_cast<const char*>(pool_->layer(PoolLayer(layer)));
  std::vector<uint16_t> narrow;
  for (int64_t r = first; r < first + n;) {
    // The rows of this block, in one copy.
    const int64_t in_block = std::min(first + n - r, o.block_tokens - r % o.block_tokens);
    const int64_t slot =
        int64_t{blocks_[static_cast<size_t>(r / o.block_tokens)]} * o.block_tokens +
        r % o.block_tokens;
    const char* src = base + slot * lat * elem;
    float* dst = out + (r - first) * lat;
    const size_t values = static_cast<size_t>(in_block * lat);
    if (o.dtype == kernels::LatentStorage::kFloat32) {
      SPLITMOE_RETURN_IF_ERROR(
          kernels::CopyToHost(pool_->device(), dst, src, values * sizeof(float)));
    } else {
      narrow.resize(values);
      SPLITMOE_RETURN_IF_ERROR(
          kernels::CopyToHost(pool_->device(), narrow.data(), src, values * sizeof(uint16_t)));
      for (size_t i = 0; i < values; ++i) dst[i] = model::Bf16ToFloat(narrow[i]);
    }
    r += in_block;
  }
  return absl::OkStatus();
}

absl::Status PooledSequenceCache::WriteRows(int64_t layer, int64_t first, const float* rows,
                                            int64_t n) {
  const kernels::Device& device = pool_->device();
  if (device.backend == kernels::Backend::kCpu) return Store(device, layer, first, rows, n);
  const size_t bytes = static_cast<size_t>(n * pool_->options().latent_dim) * sizeof(float);
  SPLITMOE_ASSIGN_OR_RETURN(kernels::DeviceBuffer on, kernels::Allocate(device, bytes));
  SPLITMOE_RETURN_IF_ERROR(kernels::CopyToDevice(device, on.data(), rows, bytes));
  return Store(device, layer, first, on.as<float>(), n);
}

kernels::LatentBlocks PooledSequenceCache::View(int64_t layer, int64_t keys) {
  const LatentPoolOptions& o = pool_->options();
  kernels::LatentBlocks view;
  view.dtype = o.dtype;
  view.block_tokens = o.block_tokens;
  view.keys = keys;
  const int64_t block_bytes = o.block_tokens * o.latent_dim * ElementBytes(o.dtype);
  const char* base = static_cast<const char*>(pool_->layer(PoolLayer(layer)));
  const int64_t n = std::min<int64_t>((keys + o.block_tokens - 1) / o.block_tokens,
                                      static_cast<int64_t>(blocks_.size()));
  for (int64_t b = 0; b < n; ++b) {
    view.blocks.push_back(base + int64_t{blocks_[static_cast<size_t>(b)]} * block_bytes);
  }
  return view;
}

SequenceCache::PoolRef PooledSequenceCache::Pool(int64_t layer) const {
  return {pool_->layer(PoolLayer(layer)), pool_->options().blocks};
}

const float* PooledSequenceCache::LayerRows(int64_t layer, int64_t keys) {
  if (pool_->device().backend != kernels::Backend::kCpu) return nullptr;
  gathered_.resize(static_cast<size_t>(std::max<int64_t>(keys, 1) * pool_->options().latent_dim));
  return ReadRows(layer, 0, keys, gathered_.data()).ok() ? gathered_.data() : nullptr;
}

}  // namespace splitmoe::engine
