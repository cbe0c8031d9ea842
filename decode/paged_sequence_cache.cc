#include "decode/paged_sequence_cache.h"

#include <algorithm>
#include <cstring>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace splitmoe::decode {

absl::Status PagedSequenceCache::Reserve(int64_t tokens) {
  const BlockTable* table = cache_->Find(id_);
  if (table == nullptr)
    return absl::NotFoundError(absl::StrCat("sequence ", id_, " has no blocks"));
  while (table->length < tokens) {
    absl::StatusOr<int64_t> position = cache_->AppendToken(id_);
    if (!position.ok()) return position.status();
    table = cache_->Find(id_);
  }
  return absl::OkStatus();
}

float* PagedSequenceCache::Row(int64_t layer, int64_t position) {
  if (bf16()) {
    std::vector<float>& row = staged_[{layer, position}];
    row.resize(static_cast<size_t>(latent_dim()));
    return row.data();
  }
  const BlockTable* table = cache_->Find(id_);
  return reinterpret_cast<float*>(cache_->RowPointer(*table, layer + layer_offset_, position));
}

void PagedSequenceCache::RowsWritten(int64_t layer) {
  if (!bf16()) return;
  const BlockTable* table = cache_->Find(id_);
  for (auto it = staged_.lower_bound({layer, 0}); it != staged_.end() && it->first.first == layer;) {
    if (table != nullptr)
      (void)cache_->StoreRow(*table, it->first.first + layer_offset_, it->first.second,
                            it->second.data());
    it = staged_.erase(it);
  }
}

kernels::LatentBlocks PagedSequenceCache::View(int64_t layer, int64_t keys) {
  const PagedLatentLayout& layout = cache_->layout();
  kernels::LatentBlocks view;
  view.dtype = bf16() ? kernels::LatentStorage::kBFloat16 : kernels::LatentStorage::kFloat32;
  view.block_tokens = layout.block_tokens;
  view.keys = keys;
  const BlockTable* table = cache_->Find(id_);
  if (table == nullptr) {
    view.keys = 0;
    return view;
  }
  view.keys = std::min(keys, table->length);
  const int64_t blocks = cache_->BlocksFor(view.keys);
  for (int64_t b = 0; b < blocks; ++b) {
    view.blocks.push_back(cache_->arena_base() +
                          cache_->LayerSlabOffset(table->blocks[static_cast<size_t>(b)],
                                                    layer + layer_offset_));
  }
  return view;
}

const float* PagedSequenceCache::LayerRows(int64_t layer, int64_t keys) {
  return HostRows(layer, keys);
}

const float* PagedSequenceCache::HostRows(int64_t layer, int64_t keys) {
  const int64_t dim = latent_dim();
  scratch_.resize(static_cast<size_t>(keys * dim));
  RowsWritten(layer);
  const BlockTable* table = cache_->Find(id_);
  if (table != nullptr && keys > 0) (void)cache_->GatherLayer(*table, layer + layer_offset_, keys, scratch_.data());
  return scratch_.data();
}

absl::Status PagedSequenceCache::ReadRows(int64_t layer, int64_t first, int64_t n, float* out) {
  if (first < 0 || n < 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " latent rows read from position ", first));
  }
  const float* rows = HostRows(layer, first + n);
  std::copy(rows + first * latent_dim(), rows + (first + n) * latent_dim(), out);
  return absl::OkStatus();
}

void PagedSequenceCache::Commit(int64_t new_length) {
  if (bf16()) {
    const BlockTable* table = cache_->Find(id_);
    for (const auto& [key, row] : staged_)
      if (table != nullptr)
        (void)cache_->StoreRow(*table, key.first + layer_offset_, key.second, row.data());
    staged_.clear();
  }
  length_ = new_length;
}

void PagedSequenceCache::Truncate(int64_t length) {
  length_ = std::min(length_, length);
  for (auto it = staged_.begin(); it != staged_.end();) {
    it = it->first.second >= length_ ? staged_.erase(it) : std::next(it);
  }
}

}  // namespace splitmoe::decode
