#include "decode/paged_sequence_cache.h"

#include <cstring>

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
  return reinterpret_cast<float*>(cache_->RowPointer(*table, layer, position));
}

const float* PagedSequenceCache::LayerRows(int64_t layer, int64_t keys) {
  const int64_t dim = latent_dim();
  scratch_.resize(static_cast<size_t>(keys * dim));
  const BlockTable* table = cache_->Find(id_);
  // Rows already stored; for bf16, the rows of this step are still staged in fp32.
  const int64_t stored = bf16() ? std::min(length_, keys) : keys;
  if (table != nullptr && stored > 0)
    (void)cache_->GatherLayer(*table, layer, stored, scratch_.data());
  for (int64_t p = stored; p < keys; ++p) {
    auto it = staged_.find({layer, p});
    if (it != staged_.end())
      std::memcpy(&scratch_[p * dim], it->second.data(), dim * sizeof(float));
  }
  return scratch_.data();
}

void PagedSequenceCache::Commit(int64_t new_length) {
  if (bf16()) {
    const BlockTable* table = cache_->Find(id_);
    for (const auto& [key, row] : staged_)
      (void)cache_->StoreRow(*table, key.first, key.second, row.data());
    staged_.clear();
  }
  length_ = new_length;
}

}  // namespace splitmoe::decode
