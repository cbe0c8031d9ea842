// PagedLatentCache: the decode worker's MLA latent cache. Per token and layer it stores exactly
// latent_dim = kv_lora_rank + qk_rope_head_dim values (the normalised c_kv, then the rotated
// RoPE key), in fp32 or bf16, inside ONE contiguous arena that is either owned (page-aligned)
// or provided by the caller (e.g. memory registered with UCX). A prefill worker writes a
// prompt's latents straight into the arena with one-sided puts, layer by layer, so the byte
// layout is part of the contract (see PagedLatentLayout) and a remote writer computes every
// offset from four numbers: num_layers, latent_dim, block_tokens, dtype.
//
// Memory is split into fixed-size blocks of `block_tokens` tokens. Sequences own blocks through
// a BlockTable (token t lives in blocks[t / block_tokens], slot t % block_tokens). Reserve() is
// all-or-nothing; AppendToken() grows a sequence one decode token at a time and takes a new
// block when the last one is full; Release() returns blocks to the free list. Every block has a
// GENERATION, incremented whenever it is released: a Reservation remembers the generation of
// each of its blocks, so Validate() can tell that a block was released (and maybe reused) since
// — which is how a late write from a cancelled transfer is fenced: the writer echoes the
// generations in its completion notification and the actor Validate()s before trusting it, so a
// notification for a cancelled reservation is never mistaken for the blocks' new owner's. The
// generation fences notifications, not bytes: the actor should release blocks with puts in
// flight only once the transport has flushed them or the writer has acknowledged the cancel.
// As a second line, freed blocks are reused in FIFO order, so a just-released block is the last
// to be handed out again.
//
// Prefix cache: a block whose rows are final (every slot written, for tokens known) can be
// published under a key — a hash chain over the tokens its rows hold and the blocks before it
// (PrefixKeys). When its last holder releases it, a published block is not freed but kept,
// evictable, with its rows and its generation: a later reservation whose prompt starts with the
// same tokens shares it in place (ReserveWithPrefix; reference counted, never written again) and
// only the rest is computed. Kept blocks are evicted least recently used first, the deepest
// block of a chain before the ones it follows, when a block is needed and none is free; an
// evicted block's generation is incremented as a freed one's is. Matches compare the stored
// tokens and parent, not only the 64-bit key, so a hash collision can never share wrong rows.
//
// Threading: the bookkeeping (Reserve, Validate, Find, AppendToken, Release, the counts) is
// guarded by a mutex, because the decode actor reserves and releases while its executor runs a
// step over the running sequences. A sequence's table and rows are used by one thread at a time
// (the actor until the sequence runs, then the step); the actor frees a running sequence only
// between steps. Remote writers touch the arena's bytes, never the bookkeeping; the actor must
// not trust those bytes before the writer's completion notification and Validate().
//
//   PagedLatentCacheOptions options;
//   options.layout = {.num_layers = 61, .latent_dim = 576, .block_tokens = 64,
//                     .dtype = LatentDType::kBFloat16};
//   options.num_blocks = 4096;
//   SPLITMOE_ASSIGN_OR_RETURN(PagedLatentCache cache, PagedLatentCache::Create(options));
//   SPLITMOE_ASSIGN_OR_RETURN(Reservation r, cache.Reserve(prompt_tokens));
//   // ... send r.blocks / r.generations to the prefill worker; it writes each layer's slab at
//   // cache.layout().LayerSlabOffset(block, layer) ... on its notification:
//   SPLITMOE_RETURN_IF_ERROR(cache.Validate(r));
//   SPLITMOE_ASSIGN_OR_RETURN(int64_t position, cache.AppendToken(r.id));    // each decode step
//   const BlockTable* table = cache.Find(r.id);
//   SPLITMOE_RETURN_IF_ERROR(cache.StoreRow(*table, layer, position, latent_row));
//   // rows [keys = position + 1, latent_dim] for the attention:
//   SPLITMOE_RETURN_IF_ERROR(cache.GatherLayer(*table, layer, position + 1, rows));
//   SPLITMOE_RETURN_IF_ERROR(cache.Release(r.id));
#ifndef SPLITMOE_DECODE_PAGED_LATENT_CACHE_H_
#define SPLITMOE_DECODE_PAGED_LATENT_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <utility>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace splitmoe::decode {

enum class LatentDType { kFloat32, kBFloat16 };

using BlockId = int32_t;
// Names a sequence's blocks from Reserve() to Release(); never reused (starts at 1; 0 = none).
using SequenceId = uint64_t;

// The byte layout of the arena, all a remote writer needs. Block-major, then layer, then token
// slot, then value:
//
//   offset(block, layer, slot, v) = block * block_bytes()
//                                 + layer * layer_slab_bytes()
//                                 + slot  * row_bytes()
//                                 + v     * value_bytes()
//   row_bytes        = latent_dim * value_bytes        (value_bytes: fp32 4, bf16 2)
//   layer_slab_bytes = block_tokens * row_bytes        ("all tokens of one layer of one block")
//   block_bytes      = num_layers * layer_slab_bytes
//
// so one layer of one block is one contiguous slab (a prefill worker puts it as soon as that
// layer is done), and a whole block is contiguous too. bf16 values are the upper 16 bits of the
// fp32 value rounded to nearest even, little-endian, as in safetensors. Slots past a sequence's
// length hold garbage.
struct PagedLatentLayout {
  int64_t num_layers = 0;
  int64_t latent_dim = 0;  // kv_lora_rank + qk_rope_head_dim
  int64_t block_tokens = 64;
  LatentDType dtype = LatentDType::kFloat32;

  int64_t value_bytes() const { return dtype == LatentDType::kFloat32 ? 4 : 2; }
  int64_t row_bytes() const { return latent_dim * value_bytes(); }
  int64_t layer_slab_bytes() const { return block_tokens * row_bytes(); }
  int64_t block_bytes() const { return num_layers * layer_slab_bytes(); }
  // Byte offset from the arena base of (block, layer)'s slab: block_tokens rows of latent_dim.
  int64_t LayerSlabOffset(BlockId block, int64_t layer) const {
    return block * block_bytes() + layer * layer_slab_bytes();
  }
  // Byte offset from the arena base of one token's row in one layer.
  int64_t RowOffset(BlockId block, int64_t layer, int64_t slot) const {
    return LayerSlabOffset(block, layer) + slot * row_bytes();
  }
  // InvalidArgument unless every field is positive.
  absl::Status Validate() const;
};

struct PagedLatentCacheOptions {
  PagedLatentLayout layout;
  // Owned arena: how many blocks to allocate (> 0). Caller arena: 0 takes as many whole blocks
  // as fit in `arena_bytes`; otherwise that many, which must fit.
  int64_t num_blocks = 0;
  // Caller-provided arena, or null for an owned one. It must stay valid (and, for UCX, stay
  // registered) for the cache's lifetime and be aligned to at least value_bytes; 4096 is best.
  void* arena = nullptr;
  int64_t arena_bytes = 0;
};

// Key of a full block in a prefix chain (PrefixKeys); 0 is never a key.
using BlockKey = uint64_t;

// What Reserve() grants, as a value that can be shipped to a remote writer.
struct Reservation {
  SequenceId id = 0;
  int64_t tokens = 0;                 // tokens reserved (the sequence's length after Reserve)
  // ReserveWithPrefix: leading tokens whose rows the shared cached blocks already hold (a
  // multiple of block_tokens); the writer writes from here on only.
  int64_t cached_tokens = 0;
  std::vector<BlockId> blocks;        // token t: blocks[t / block_tokens], slot t % block_tokens
  std::vector<uint64_t> generations;  // aligned with blocks: each block's generation when granted
};

// A live sequence's blocks; owned by the cache, read through Find().
struct BlockTable {
  SequenceId id = 0;
  int64_t length = 0;                 // tokens with a slot: reserved plus appended
  std::vector<BlockId> blocks;        // capacity = blocks.size() * block_tokens >= length
  std::vector<uint64_t> generations;  // aligned with blocks
};

class PagedLatentCache {
 public:
  // Owned arena (options.arena null) or the caller's. InvalidArgument for a bad layout, a
  // misaligned or too small arena, or num_blocks that does not fit; ResourceExhausted when the
  // allocation fails.
  static absl::StatusOr<PagedLatentCache> Create(const PagedLatentCacheOptions& options);

  PagedLatentCache(PagedLatentCache&&) = default;
  PagedLatentCache& operator=(PagedLatentCache&&) = default;
  PagedLatentCache(const PagedLatentCache&) = delete;
  PagedLatentCache& operator=(const PagedLatentCache&) = delete;

  // Blocks for `tokens` + `extra_tokens` tokens (extra: decode headroom, so the sequence will
  // not run out mid-generation), all or nothing; the new sequence's length is `tokens`.
  // InvalidArgument for negative counts; ResourceExhausted (nothing taken) when too few blocks
  // are free.
  absl::StatusOr<Reservation> Reserve(int64_t tokens, int64_t extra_tokens = 0);

  // The key of every full block of `tokens` (block i holds tokens [i * T, (i + 1) * T)), each
  // chained on the one before: equal keys mean equal token prefixes (up to a 64-bit hash, which
  // matches verify).
  static std::vector<BlockKey> PrefixKeys(absl::Span<const int32_t> tokens, int64_t block_tokens);

  // Leading tokens of `prompt` whose rows are cached here: a multiple of block_tokens, at most
  // `limit` (a prefill must compute at least the last prompt token, so callers pass size - 1).
  int64_t CachedPrefixTokens(absl::Span<const int32_t> prompt, int64_t limit) const;

  // As Reserve, but the sequence starts with the cached blocks of the longest cached prefix of
  // `prompt` (at most prompt.size() - 1 tokens, whole blocks), shared in place; fresh blocks
  // follow. `tokens` >= prompt.size() is the sequence's length. All or nothing.
  absl::StatusOr<Reservation> ReserveWithPrefix(absl::Span<const int32_t> prompt, int64_t tokens,
                                                int64_t extra_tokens = 0);

  // Publishes the sequence's full blocks that hold rows of `tokens` (its first tokens, whose rows
  // are final in every layer) under their prefix keys, so they outlive the sequence. A block
  // already published, or whose key another block holds, stays as it is. NotFound for an unknown
  // id.
  absl::Status Publish(SequenceId id, absl::Span<const int32_t> tokens);

  // OK iff the reservation's sequence is live and none of its blocks has been released since it
  // was granted (FailedPrecondition otherwise, naming the first stale block).
  absl::Status Validate(const Reservation& reservation) const;

  // The live sequence's table, or null. Valid until the sequence is released; changed only by
  // AppendToken of the same sequence.
  const BlockTable* Find(SequenceId id) const;

  // Gives the sequence one more token slot and returns its position (the old length); takes a
  // free block when the last one is full. NotFound for an unknown id; ResourceExhausted (length
  // unchanged) when no block is free.
  absl::StatusOr<int64_t> AppendToken(SequenceId id);

  // Gives the sequence slots up to `tokens` (its length becomes max(length, tokens)), taking the
  // blocks that needs, all or nothing: NotFound for an unknown id; ResourceExhausted (nothing
  // taken) when too few blocks are free. How a decode step's room is made before it runs.
  absl::Status Grow(SequenceId id, int64_t tokens);
  // Blocks Grow(id, tokens) would take (0 when the sequence has room or is unknown).
  int64_t BlocksToGrow(SequenceId id, int64_t tokens) const;

  // Frees all blocks of the sequence (each block's generation is incremented). NotFound for an
  // unknown id.
  absl::Status Release(SequenceId id);
  // Same, but first Validate()s: a stale reservation frees nothing (FailedPrecondition), so it
  // can never free blocks that now belong to someone else.
  absl::Status Release(const Reservation& reservation);

  // Address of (layer, position)'s row, latent_dim values of dtype, or null unless
  // 0 <= layer < num_layers and 0 <= position < capacity of `table`.
  uint8_t* RowPointer(const BlockTable& table, int64_t layer, int64_t position);
  const uint8_t* RowPointer(const BlockTable& table, int64_t layer, int64_t position) const;

  // Writes one fp32 row [latent_dim] at (layer, position), converting to the cache's dtype.
  // InvalidArgument when out of range.
  absl::Status StoreRow(const BlockTable& table, int64_t layer, int64_t position, const float* row);

  // out[keys, latent_dim] (fp32) = rows [0, keys) of `layer`, converted from bf16 when needed:
  // the contiguous rows the absorbed attention reads. InvalidArgument unless
  // 0 <= keys <= capacity of `table` and the layer exists.
  absl::Status GatherLayer(const BlockTable& table, int64_t layer, int64_t keys, float* out) const;

  // Byte offset of (block, layer)'s slab from arena_base(): what a remote writer targets.
  int64_t LayerSlabOffset(BlockId block, int64_t layer) const {
    return layout_.LayerSlabOffset(block, layer);
  }

  const PagedLatentLayout& layout() const { return layout_; }
  uint8_t* arena_base() { return base_; }
  const uint8_t* arena_base() const { return base_; }
  int64_t arena_bytes() const { return num_blocks_ * layout_.block_bytes(); }  // used part
  bool owns_arena() const { return owned_ != nullptr; }

  int64_t num_blocks() const { return num_blocks_; }
  int64_t blocks_free() const;
  int64_t blocks_used() const { return num_blocks_ - blocks_free(); }
  int64_t bytes_used() const { return blocks_used() * layout_.block_bytes(); }
  int64_t bytes_free() const { return blocks_free() * layout_.block_bytes(); }
  int64_t sequences() const;
  // Published blocks that no sequence holds: kept for later prompts, evicted when needed. They
  // count as free in blocks_free().
  int64_t blocks_cached() const;
  // Prefix-cache counters: tokens asked for by ReserveWithPrefix (every full block of the
  // matchable part) and tokens found; blocks evicted.
  int64_t prefix_tokens_queried() const;
  int64_t prefix_tokens_hit() const;
  int64_t blocks_evicted() const;
  // Blocks needed for `tokens` tokens.
  int64_t BlocksFor(int64_t tokens) const {
    return (tokens + layout_.block_tokens - 1) / layout_.block_tokens;
  }
  // Generation of one block (tests, debugging, a remote writer's fence check).
  uint64_t generation(BlockId block) const;

 private:
  struct AlignedFree {
    void operator()(uint8_t* p) const;
  };
  struct BlockState {
    int32_t refs = 0;  // sequences holding it; 0: free, or kept (published)
    uint64_t generation = 0;
    // Published: its key, the key of the block before it (0 for the first) and its tokens.
    BlockKey key = 0;
    BlockKey parent = 0;
    std::vector<int32_t> tokens;
    uint64_t kept_at = 0;  // lru_ entry while kept
  };

  PagedLatentCache() = default;
  // Takes one block for a new holder: from the free list, else the least recently kept
  // published block is evicted (the caller checked there is one of either).
  BlockId TakeBlock(uint64_t* generation);
  int64_t AvailableLocked() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  // The cached blocks of the longest cached prefix of `prompt`, at most `limit` tokens.
  std::vector<BlockId> MatchLocked(absl::Span<const int32_t> prompt, int64_t limit) const;
  absl::Status ValidateLocked(const Reservation& reservation) const;
  absl::Status ReleaseLocked(SequenceId id);

  PagedLatentLayout layout_;
  int64_t num_blocks_ = 0;
  std::unique_ptr<uint8_t[], AlignedFree> owned_;
  uint8_t* base_ = nullptr;
  std::vector<BlockState> blocks_;  // [num_blocks]
  std::deque<BlockId> free_;        // FIFO: the least recently freed block is reused first
  std::set<std::pair<uint64_t, BlockId>> lru_;   // kept published blocks, by kept_at
  std::unordered_map<BlockKey, BlockId> index_;  // published blocks by key
  uint64_t clock_ = 0;
  int64_t prefix_queried_ = 0, prefix_hit_ = 0, evicted_ = 0;
  // Guards blocks_, free_, tables_ and next_id_ (a pointer, so the cache stays movable).
  std::unique_ptr<std::mutex> mu_ = std::make_unique<std::mutex>();
  std::unordered_map<SequenceId, BlockTable> tables_;
  SequenceId next_id_ = 1;
};

}  // namespace splitmoe::decode

#endif  // SPLITMOE_DECODE_PAGED_LATENT_CACHE_H_
