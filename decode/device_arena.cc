#include "decode/device_arena.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/base/log.h"
#include "common/base/status_macros.h"

namespace splitmoe::decode {

absl::StatusOr<std::unique_ptr<DeviceArena>> DeviceArena::Create(const kernels::Device& device,
                                                                  const PagedLatentLayout& layout,
                                                                  uint8_t* host,
                                                                  int64_t num_blocks) {
  SPLITMOE_RETURN_IF_ERROR(layout.Validate());
  if (host == nullptr || num_blocks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("a device arena needs the host arena and blocks, got ", num_blocks));
  }
  std::unique_ptr<DeviceArena> arena(new DeviceArena(device, layout, host, num_blocks));
  const size_t bytes = static_cast<size_t>(num_blocks * layout.block_bytes());
  absl::StatusOr<kernels::DeviceBuffer> buffer = kernels::Allocate(device, bytes);
  if (!buffer.ok()) {
    return Annotate(buffer.status(),
                    absl::StrCat("the decode cache on ", kernels::DeviceName(device), " (",
                                 num_blocks, " blocks, ", bytes >> 20, " MiB)"));
  }
  arena->buffer_ = std::move(*buffer);
  absl::Status pinned = kernels::PinHost(device, host, bytes);
  arena->pinned_ = pinned.ok();
  if (!pinned.ok()) {
    SPLITMOE_LOG(WARNING, "decode").With("device", kernels::DeviceName(device))
        << "the latent cache's host arena could not be page-locked; copies go through pageable "
           "memory: "
        << pinned.message();
  }
  return arena;
}

DeviceArena::~DeviceArena() {
  if (pinned_) kernels::UnpinHost(device_, host_);
}

std::string DeviceArena::Describe() const {
  return absl::StrCat("staged through ", pinned_ ? "pinned" : "pageable",
                      " host memory into ", kernels::DeviceName(device_));
}

std::unique_ptr<DeviceSequenceCache> DeviceArena::View(PagedLatentCache* cache, SequenceId id,
                                                       int64_t stored_tokens,
                                                       int64_t layer_offset,
                                                       std::shared_ptr<PendingUpload> upload) {
  return std::make_unique<DeviceSequenceCache>(this, cache, id, stored_tokens, layer_offset,
                                               std::move(upload));
}

absl::Status DeviceArena::UploadBlocks(const BlockTable& table, int64_t first_token,
                                       int64_t end_token) {
  const int64_t bt = layout_.block_tokens, block_bytes = layout_.block_bytes();
  const int64_t first = std::max<int64_t>(first_token, 0) / bt;
  const int64_t end =
      std::min<int64_t>((end_token + bt - 1) / bt, static_cast<int64_t>(table.blocks.size()));
  for (int64_t b = first; b < end;) {
    // A run of consecutive block ids is one contiguous range in both arenas.
    int64_t run = 1;
    while (b + run < end && table.blocks[static_cast<size_t>(b + run)] ==
                                table.blocks[static_cast<size_t>(b)] + run) {
      ++run;
    }
    const int64_t offset = int64_t{table.blocks[static_cast<size_t>(b)]} * block_bytes;
    SPLITMOE_RETURN_IF_ERROR(kernels::CopyToDeviceAsync(device_, device_base() + offset,
                                                        host_ + offset,
                                                        static_cast<size_t>(run * block_bytes)));
    b += run;
  }
  return absl::OkStatus();
}

absl::Status DeviceArena::CopyRows(const BlockTable& table, int64_t layer, int64_t first,
                                   int64_t n, bool to_host) {
  const int64_t bt = layout_.block_tokens;
  const int64_t capacity = static_cast<int64_t>(table.blocks.size()) * bt;
  if (layer < 0 || layer >= layout_.num_layers || first < 0 || n < 0 || first + n > capacity) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", table.id, ": rows [", first, ", ", first + n, ") of layer ", layer,
        " (capacity ", capacity, " tokens, ", layout_.num_layers, " layers)"));
  }
  for (int64_t r = first; r < first + n;) {
    // The rows of one layer of one block are contiguous.
    const int64_t rows = std::min(first + n - r, bt - r % bt);
    const int64_t offset =
        layout_.RowOffset(table.blocks[static_cast<size_t>(r / bt)], layer, r % bt);
    const size_t bytes = static_cast<size_t>(rows * layout_.row_bytes());
    SPLITMOE_RETURN_IF_ERROR(
        to_host
            ? kernels::CopyToHostAsync(device_, host_ + offset, device_base() + offset, bytes)
            : kernels::CopyToDeviceAsync(device_, device_base() + offset, host_ + offset, bytes));
    r += rows;
  }
  return absl::OkStatus();
}

absl::Status DeviceSequenceCache::Reserve(int64_t tokens) {
  SPLITMOE_RETURN_IF_ERROR(PagedSequenceCache::Reserve(tokens));
  const BlockTable* table = cache_->Find(id_);
  if (upload_ != nullptr && !upload_->done) {
    SPLITMOE_RETURN_IF_ERROR(
        Annotate(arena_->UploadBlocks(*table, upload_->first_token, upload_->end_token),
                 absl::StrCat("copying sequence ", id_, "'s prompt latents to ",
                              kernels::DeviceName(arena_->device()))));
    upload_->done = true;
  }
  if (static_cast<int64_t>(table->blocks.size()) == table_.size()) return absl::OkStatus();
  return table_.Set(arena_->device(), table->blocks);
}

absl::Status DeviceSequenceCache::Store(const kernels::Device& device, int64_t layer,
                                        int64_t start, const float* rows, int64_t n) {
  const kernels::Device& own = arena_->device();
  if (device.backend != own.backend || device.index != own.index) {
    return absl::FailedPreconditionError(
        absl::StrCat("latent rows from ", kernels::DeviceName(device),
                     " stored into the decode cache on ", kernels::DeviceName(own)));
  }
  const BlockTable* table = cache_->Find(id_);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("sequence ", id_, " has no blocks"));
  const PagedLatentLayout& layout = arena_->layout();
  const int64_t arena_layer = layer + layer_offset_;
  if (layer < 0 || arena_layer >= layout.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("latent layer ", layer, " (+", layer_offset_, ") of a cache of ",
                     layout.num_layers));
  }
  kernels::StoreLatentsParams p;
  p.rows = rows;
  p.n = n;
  p.latent_dim = layout.latent_dim;
  p.start = start;
  p.block_table = table_.data();
  p.table_blocks = table_.size();
  p.block_tokens = layout.block_tokens;
  p.pool = arena_->device_base() + layout.LayerSlabOffset(0, arena_layer);
  p.pool_blocks = arena_->num_blocks();
  p.dtype = bf16() ? kernels::LatentStorage::kBFloat16 : kernels::LatentStorage::kFloat32;
  p.pool_block_stride = layout.block_bytes() / layout.value_bytes();
  SPLITMOE_RETURN_IF_ERROR(kernels::StoreLatents(device, p));
  // Write-through: the host arena holds what the device does (a cached prefix is read there).
  return arena_->CopyRows(*table, arena_layer, start, n, /*to_host=*/true);
}

absl::Status DeviceSequenceCache::ReadRows(int64_t layer, int64_t first, int64_t n, float* out) {
  if (first < 0 || n < 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " latent rows read from position ", first));
  }
  SPLITMOE_RETURN_IF_ERROR(kernels::Synchronize(arena_->device()));  // the write-through landed
  const float* rows = HostRows(layer, first + n);
  std::copy(rows + first * latent_dim(), rows + (first + n) * latent_dim(), out);
  return absl::OkStatus();
}

absl::Status DeviceSequenceCache::WriteRows(int64_t layer, int64_t first, const float* rows,
                                            int64_t n) {
  const BlockTable* table = cache_->Find(id_);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("sequence ", id_, " has no blocks"));
  for (int64_t r = 0; r < n; ++r) {
    SPLITMOE_RETURN_IF_ERROR(
        cache_->StoreRow(*table, layer + layer_offset_, first + r, rows + r * latent_dim()));
  }
  return arena_->CopyRows(*table, layer + layer_offset_, first, n, /*to_host=*/false);
}

kernels::LatentBlocks DeviceSequenceCache::View(int64_t layer, int64_t keys) {
  kernels::LatentBlocks view = PagedSequenceCache::View(layer, keys);
  for (const void*& block : view.blocks) {
    block = arena_->DeviceAddress(static_cast<const uint8_t*>(block));
  }
  return view;
}

engine::SequenceCache::PoolRef DeviceSequenceCache::Pool(int64_t layer) const {
  const PagedLatentLayout& layout = arena_->layout();
  return {arena_->device_base() + layout.LayerSlabOffset(0, layer + layer_offset_),
          arena_->num_blocks(), layout.block_bytes() / layout.value_bytes()};
}

const float* DeviceSequenceCache::LayerRows(int64_t layer, int64_t keys) {
  if (arena_->device().backend != kernels::Backend::kCpu) return nullptr;
  return HostRows(layer, keys);
}

}  // namespace splitmoe::decode
