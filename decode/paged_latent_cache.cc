#include "decode/paged_latent_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/base/prefix_keys.h"
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

BlockId PagedLatentCache::TakeBlock(uint64_t* generation) {
  BlockId block;
  if (!free_.empty()) {
    block = free_.front();
    free_.pop_front();
  } else {
    // Evict the least recently kept published block: its rows go, as a freed block's do.
    block = lru_.begin()->second;
    lru_.erase(lru_.begin());
    BlockState& evicted = blocks_[static_cast<size_t>(block)];
    index_.erase(evicted.key);
    evicted.key = evicted.parent = 0;
    evicted.tokens.clear();
    ++evicted.generation;
    ++evicted_;
  }
  BlockState& state = blocks_[static_cast<size_t>(block)];
  state.refs = 1;
  *generation = state.generation;
  return block;
}

std::vector<BlockKey> PagedLatentCache::PrefixKeys(absl::Span<const int32_t> tokens,
                                                   int64_t block_tokens) {
  return splitmoe::PrefixKeys(tokens, block_tokens);
}

std::vector<BlockId> PagedLatentCache::MatchLocked(absl::Span<const int32_t> prompt,
                                                   int64_t limit) const {
  const int64_t t = layout_.block_tokens;
  const std::vector<BlockKey> keys =
      PrefixKeys(prompt.subspan(0, static_cast<size_t>(std::clamp<int64_t>(
                                       limit, 0, static_cast<int64_t>(prompt.size())))),
                 t);
  std::vector<BlockId> match;
  BlockKey parent = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = index_.find(keys[i]);
    if (it == index_.end()) break;
    const BlockState& state = blocks_[static_cast<size_t>(it->second)];
    // The key is a hash: the stored tokens and parent decide.
    const auto tokens = prompt.subspan(i * static_cast<size_t>(t), static_cast<size_t>(t));
    if (state.parent != parent ||
        !std::equal(tokens.begin(), tokens.end(), state.tokens.begin(), state.tokens.end())) {
      break;
    }
    match.push_back(it->second);
    parent = keys[i];
  }
  return match;
}

int64_t PagedLatentCache::CachedPrefixTokens(absl::Span<const int32_t> prompt,
                                             int64_t limit) const {
  std::lock_guard<std::mutex> lock(*mu_);
  return static_cast<int64_t>(MatchLocked(prompt, limit).size()) * layout_.block_tokens;
}

absl::StatusOr<Reservation> PagedLatentCache::ReserveWithPrefix(absl::Span<const int32_t> prompt,
                                                                int64_t tokens,
                                                                int64_t extra_tokens) {
  if (tokens < static_cast<int64_t>(prompt.size()) || extra_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot reserve ", tokens, " + ", extra_tokens,
                                                   " tokens for a prompt of ", prompt.size()));
  }
  const int64_t need = BlocksFor(tokens + extra_tokens);
  std::lock_guard<std::mutex> lock(*mu_);
  const std::vector<BlockId> shared =
      MatchLocked(prompt, static_cast<int64_t>(prompt.size()) - 1);
  // Kept blocks about to be shared are not evictable room.
  int64_t kept_shared = 0;
  for (BlockId b : shared) kept_shared += blocks_[static_cast<size_t>(b)].refs == 0 ? 1 : 0;
  const int64_t fresh = need - static_cast<int64_t>(shared.size());
  if (fresh > AvailableLocked() - kept_shared) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "latent cache full: ", tokens + extra_tokens, " tokens need ", fresh, " blocks beyond ",
        shared.size(), " cached, ", AvailableLocked() - kept_shared, " of ", num_blocks_,
        " free"));
  }
  const int64_t matchable = std::max<int64_t>(0, static_cast<int64_t>(prompt.size()) - 1);
  prefix_queried_ += matchable / layout_.block_tokens * layout_.block_tokens;
  prefix_hit_ += static_cast<int64_t>(shared.size()) * layout_.block_tokens;
  BlockTable table;
  table.id = next_id_++;
  table.length = tokens;
  for (BlockId b : shared) {
    BlockState& state = blocks_[static_cast<size_t>(b)];
    if (state.refs++ == 0) lru_.erase({state.kept_at, b});
    table.blocks.push_back(b);
    table.generations.push_back(state.generation);
  }
  for (int64_t i = 0; i < fresh; ++i) {
    uint64_t generation = 0;
    table.blocks.push_back(TakeBlock(&generation));
    table.generations.push_back(generation);
  }
  Reservation reservation{table.id, tokens,
                          static_cast<int64_t>(shared.size()) * layout_.block_tokens,
                          table.blocks, table.generations};
  tables_.emplace(table.id, std::move(table));
  return reservation;
}

absl::Status PagedLatentCache::Publish(SequenceId id, absl::Span<const int32_t> tokens) {
  std::lock_guard<std::mutex> lock(*mu_);
  auto it = tables_.find(id);
  if (it == tables_.end()) {
    return absl::NotFoundError(absl::StrCat("no latent cache sequence ", id));
  }
  const BlockTable& table = it->second;
  const int64_t t = layout_.block_tokens;
  const int64_t rows = std::min<int64_t>(static_cast<int64_t>(tokens.size()), table.length);
  const std::vector<BlockKey> keys = PrefixKeys(tokens.subspan(0, static_cast<size_t>(rows)), t);
  BlockKey parent = 0;
  for (size_t i = 0; i < keys.size() && i < table.blocks.size(); ++i) {
    BlockState& state = blocks_[static_cast<size_t>(table.blocks[i])];
    // Another block may hold this key (the same rows): the chain goes on through it.
    if (state.key == 0 && index_.count(keys[i]) == 0) {
      state.key = keys[i];
      state.parent = parent;
      state.tokens.assign(tokens.begin() + static_cast<int64_t>(i) * t,
                          tokens.begin() + static_cast<int64_t>(i + 1) * t);
      index_[keys[i]] = table.blocks[i];
    }
    parent = keys[i];
  }
  return absl::OkStatus();
}

absl::StatusOr<Reservation> PagedLatentCache::Reserve(int64_t tokens, int64_t extra_tokens) {
  if (tokens < 0 || extra_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot reserve ", tokens, " + ", extra_tokens, " tokens"));
  }
  const int64_t need = BlocksFor(tokens + extra_tokens);
  std::lock_guard<std::mutex> lock(*mu_);
  const int64_t free_blocks = AvailableLocked();
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
    table.blocks.push_back(TakeBlock(&generation));
    table.generations.push_back(generation);
  }
  Reservation reservation{table.id, tokens, 0, table.blocks, table.generations};
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
    if (state.refs == 0 || state.generation != reservation.generations[i]) {
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
    if (AvailableLocked() == 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("latent cache full: sequence ", id, " needs a block for token ", position));
    }
    uint64_t generation = 0;
    table.blocks.push_back(TakeBlock(&generation));
    table.generations.push_back(generation);
  }
  table.length = position + 1;
  return position;
}

absl::Status PagedLatentCache::Grow(SequenceId id, int64_t tokens) {
  std::lock_guard<std::mutex> lock(*mu_);
  auto it = tables_.find(id);
  if (it == tables_.end()) {
    return absl::NotFoundError(absl::StrCat("no latent cache sequence ", id));
  }
  BlockTable& table = it->second;
  if (tokens <= table.length) return absl::OkStatus();
  const int64_t have = static_cast<int64_t>(table.blocks.size());
  const int64_t need = BlocksFor(tokens) - have;
  if (need > AvailableLocked()) {
    return absl::ResourceExhaustedError(absl::StrCat("latent cache full: sequence ", id,
                                                     " needs ", need, " blocks for ", tokens,
                                                     " tokens, ", AvailableLocked(), " free"));
  }
  for (int64_t b = 0; b < need; ++b) {
    uint64_t generation = 0;
    table.blocks.push_back(TakeBlock(&generation));
    table.generations.push_back(generation);
  }
  table.length = tokens;
  return absl::OkStatus();
}

int64_t PagedLatentCache::BlocksToGrow(SequenceId id, int64_t tokens) const {
  std::lock_guard<std::mutex> lock(*mu_);
  auto it = tables_.find(id);
  if (it == tables_.end()) return 0;
  return std::max<int64_t>(0, BlocksFor(tokens) - static_cast<int64_t>(it->second.blocks.size()));
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
  // Deepest block first: a chain's later blocks are kept with older stamps, so they are evicted
  // before the blocks they follow.
  const std::vector<BlockId>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) {
    BlockState& state = blocks_[static_cast<size_t>(*b)];
    if (--state.refs > 0) continue;  // another sequence shares it
    if (state.key != 0) {
      state.kept_at = ++clock_;
      lru_.insert({state.kept_at, *b});
    } else {
      ++state.generation;
      free_.push_back(*b);
    }
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
  return AvailableLocked();
}

int64_t PagedLatentCache::blocks_cached() const {
  std::lock_guard<std::mutex> lock(*mu_);
  return static_cast<int64_t>(lru_.size());
}

int64_t PagedLatentCache::prefix_tokens_queried() const {
  std::lock_guard<std::mutex> lock(*mu_);
  return prefix_queried_;
}

int64_t PagedLatentCache::prefix_tokens_hit() const {
  std::lock_guard<std::mutex> lock(*mu_);
  return prefix_hit_;
}

int64_t PagedLatentCache::blocks_evicted() const {
  std::lock_guard<std::mutex> lock(*mu_);
  return evicted_;
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
