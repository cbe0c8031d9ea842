#include "decode/paged_latent_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/model/numeric.h"

namespace splitmoe::decode {
namespace {

constexpr size_t kOwnedAlignment = 4096;  // page: what memory registration likes best

}  // namespace

absl::Status PagedLatentLayout::Validate() const {
  if (num_layers <= 0 || latent_dim <= 0 || block_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "paged latent layout needs positive num_layers, latent_dim and block_tokens, got ",
        num_layers, ", ", latent_dim, ", ", block_tokens));
  }
  return absl::OkStatus();
}

void PagedLatentCache::AlignedFree::operator()(uint8_t* p) const {
  ::operator delete[](p, std::align_val_t(kOwnedAlignment));
}

absl::StatusOr<PagedLatentCache> PagedLatentCache::Create(const PagedLatentCacheOptions& options) {
  const PagedLatentLayout& layout = options.layout;
  if (absl::Status s = layout.Validate(); !s.ok()) return s;
  if (options.num_blocks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_blocks must be >= 0, got ", options.num_blocks));
  }
  const int64_t block_bytes = layout.block_bytes();
  PagedLatentCache cache;
  cache.layout_ = layout;
  if (options.arena == nullptr) {
    if (options.num_blocks == 0) {
      return absl::InvalidArgumentError("an owned latent arena needs num_blocks > 0");
    }
    if (options.num_blocks > std::numeric_limits<int64_t>::max() / block_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("latent arena of ", options.num_blocks, " blocks overflows"));
    }
    const int64_t bytes = options.num_blocks * block_bytes;
    uint8_t* p = static_cast<uint8_t*>(::operator new[](
        static_cast<size_t>(bytes), std::align_val_t(kOwnedAlignment), std::nothrow));
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate a latent arena of ", bytes, " bytes"));
    }
    cache.owned_.reset(p);
    cache.base_ = p;
    cache.num_blocks_ = options.num_blocks;
  } else {
    if (reinterpret_cast<uintptr_t>(options.arena) % static_cast<uintptr_t>(layout.value_bytes())) {
      return absl::InvalidArgumentError(
          absl::StrCat("latent arena must be aligned to ", layout.value_bytes(), " bytes"));
    }
    const int64_t fit = options.arena_bytes < 0 ? 0 : options.arena_bytes / block_bytes;
    const int64_t want = options.num_blocks == 0 ? fit : options.num_blocks;
    if (want == 0 || want > fit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "latent arena of ", options.arena_bytes, " bytes holds ", fit, " blocks of ", block_bytes,
          " bytes; ", options.num_blocks == 0 ? 1 : options.num_blocks, " needed"));
    }
    cache.base_ = static_cast<uint8_t*>(options.arena);
    cache.num_blocks_ = want;
  }
  cache.blocks_.resize(static_cast<size_t>(cache.num_blocks_));
  for (int64_t b = 0; b < cache.num_blocks_; ++b) cache.free_.push_back(static_cast<BlockId>(b));
  return cache;
}

BlockId PagedLatentCache::TakeBlock(SequenceId owner, uint64_t* generation) {
  const BlockId block = free_.front();
  free_.pop_front();
  BlockState& state = blocks_[static_cast<size_t>(block)];
  state.owner = owner;
  *generation = state.generation;
  return block;
}

absl::StatusOr<Reservation> PagedLatentCache::Reserve(int64_t tokens, int64_t extra_tokens) {
  if (tokens < 0 || extra_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot reserve ", tokens, " + ", extra_tokens, " tokens"));
  }
  const int64_t need = BlocksFor(tokens + extra_tokens);
  std::lock_guard<std::mutex> lock(*mu_);
  const auto free_blocks = static_cast<int64_t>(free_.size());
  if (need > free_blocks) {
    return absl::ResourceExhaustedError(absl::StrCat("latent cache full: ", tokens + extra_tokens,
                                                     " tokens need ", need, " blocks, ",
                                                     free_blocks, " of ", num_blocks_, " free"));
  }
  BlockTable table;
  table.id = next_id_++;
  table.length = tokens;
  table.blocks.reserve(static_cast<size_t>(need));
  table.generations.reserve(static_cast<size_t>(need));
  for (int64_t i = 0; i < need; ++i) {
    uint64_t generation = 0;
    table.blocks.push_back(TakeBlock(table.id, &generation));
    table.generations.push_back(generation);
  }
  Reservation reservation{table.id, tokens, table.blocks, table.generations};
  tables_.emplace(table.id, std::move(table));
  return reservation;
}

absl::Status PagedLatentCache::Validate(const Reservation& reservation) const {
  std::lock_guard<std::mutex> lock(*mu_);
  return ValidateLocked(reservation);
}

absl::Status PagedLatentCache::ValidateLocked(const Reservation& reservation) const {
  if (tables_.find(reservation.id) == tables_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("reservation ", reservation.id, " has been released"));
  }
  if (reservation.blocks.size() != reservation.generations.size()) {
    return absl::InvalidArgumentError(absl::StrCat("reservation ", reservation.id, " has ",
                                                   reservation.blocks.size(), " blocks but ",
                                                   reservation.generations.size(), " generations"));
  }
  for (size_t i = 0; i < reservation.blocks.size(); ++i) {
    const BlockId b = reservation.blocks[i];
    if (b < 0 || b >= num_blocks_) {
      return absl::InvalidArgumentError(
          absl::StrCat("reservation ", reservation.id, " names block ", b, " of ", num_blocks_));
    }
    const BlockState& state = blocks_[static_cast<size_t>(b)];
    if (state.owner != reservation.id || state.generation != reservation.generations[i]) {
      return absl::FailedPreconditionError(absl::StrCat(
          "reservation ", reservation.id, ": block ", b, " was released since (generation ",
          reservation.generations[i], ", now ", state.generation, ")"));
    }
  }
  return absl::OkStatus();
}

const BlockTable* PagedLatentCache::Find(SequenceId id) const {
  std::lock_guard<std::mutex> lock(*mu_);
  auto it = tables_.find(id);
  return it == tables_.end() ? nullptr : &it->second;
}

absl::StatusOr<int64_t> PagedLatentCache::AppendToken(SequenceId id) {
  std::lock_guard<std::mutex> lock(*mu_);
  auto it = tables_.find(id);
  if (it == tables_.end()) {
    return absl::NotFoundError(absl::StrCat("no latent cache sequence ", id));
  }
  BlockTable& table = it->second;
  const int64_t position = table.length;
  if (position == static_cast<int64_t>(table.blocks.size()) * layout_.block_tokens) {
    if (free_.empty()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("latent cache full: sequence ", id, " needs a block for token ", position));
    }
    uint64_t generation = 0;
    table.blocks.push_back(TakeBlock(id, &generation));
    table.generations.push_back(generation);
  }
  table.length = position + 1;
  return position;
}

absl::Status PagedLatentCache::Release(SequenceId id) {
  std::lock_guard<std::mutex> lock(*mu_);
  return ReleaseLocked(id);
}

absl::Status PagedLatentCache::ReleaseLocked(SequenceId id) {
  auto it = tables_.find(id);
  if (it == tables_.end()) {
    return absl::NotFoundError(absl::StrCat("no latent cache sequence ", id));
  }
  for (BlockId b : it->second.blocks) {
    BlockState& state = blocks_[static_cast<size_t>(b)];
    state.owner = 0;
    ++state.generation;
    free_.push_back(b);
  }
  tables_.erase(it);
  return absl::OkStatus();
}

absl::Status PagedLatentCache::Release(const Reservation& reservation) {
  std::lock_guard<std::mutex> lock(*mu_);
  if (absl::Status s = ValidateLocked(reservation); !s.ok()) return s;
  return ReleaseLocked(reservation.id);
}

int64_t PagedLatentCache::blocks_free() const {
  std::lock_guard<std::mutex> lock(*mu_);
  return static_cast<int64_t>(free_.size());
}

int64_t PagedLatentCache::sequences() const {
  std::lock_guard<std::mutex> lock(*mu_);
  return static_cast<int64_t>(tables_.size());
}

uint64_t PagedLatentCache::generation(BlockId block) const {
  std::lock_guard<std::mutex> lock(*mu_);
  return blocks_[static_cast<size_t>(block)].generation;
}

const uint8_t* PagedLatentCache::RowPointer(const BlockTable& table, int64_t layer,
                                            int64_t position) const {
  if (layer < 0 || layer >= layout_.num_layers || position < 0 ||
      position >= static_cast<int64_t>(table.blocks.size()) * layout_.block_tokens) {
    return nullptr;
  }
  const BlockId block = table.blocks[static_cast<size_t>(position / layout_.block_tokens)];
  return base_ + layout_.RowOffset(block, layer, position % layout_.block_tokens);
}

uint8_t* PagedLatentCache::RowPointer(const BlockTable& table, int64_t layer, int64_t position) {
  return const_cast<uint8_t*>(std::as_const(*this).RowPointer(table, layer, position));
}

absl::Status PagedLatentCache::StoreRow(const BlockTable& table, int64_t layer, int64_t position,
                                        const float* row) {
  uint8_t* dst = RowPointer(table, layer, position);
  if (dst == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", table.id, ": no row for layer ", layer, " position ", position));
  }
  if (layout_.dtype == LatentDType::kFloat32) {
    std::memcpy(dst, row, static_cast<size_t>(layout_.row_bytes()));
  } else {
    for (int64_t v = 0; v < layout_.latent_dim; ++v) {
      const uint16_t bits = model::FloatToBf16(row[v]);
      std::memcpy(dst + 2 * v, &bits, 2);
    }
  }
  return absl::OkStatus();
}

absl::Status PagedLatentCache::GatherLayer(const BlockTable& table, int64_t layer, int64_t keys,
                                           float* out) const {
  const int64_t capacity = static_cast<int64_t>(table.blocks.size()) * layout_.block_tokens;
  if (layer < 0 || layer >= layout_.num_layers || keys < 0 || keys > capacity) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", table.id, ": cannot gather ", keys, " keys of layer ", layer,
                     " (capacity ", capacity, " tokens, ", layout_.num_layers, " layers)"));
  }
  const int64_t dim = layout_.latent_dim;
  // One run per block: the rows of one layer of one block are contiguous.
  for (int64_t first = 0; first < keys; first += layout_.block_tokens) {
    const int64_t rows = std::min(layout_.block_tokens, keys - first);
    const BlockId block = table.blocks[static_cast<size_t>(first / layout_.block_tokens)];
    const uint8_t* src = base_ + layout_.LayerSlabOffset(block, layer);
    float* dst = out + first * dim;
    if (layout_.dtype == LatentDType::kFloat32) {
      std::memcpy(dst, src, static_cast<size_t>(rows * layout_.row_bytes()));
    } else {
      for (int64_t i = 0; i < rows * dim; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        dst[i] = model::Bf16ToFloat(bits);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::decode
