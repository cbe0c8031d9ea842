#include "decode/paged_latent_cache.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "common/model/numeric.h"
#include "gtest/gtest.h"

namespace splitmoe::decode {
namespace {

PagedLatentCacheOptions SmallOptions(LatentDType dtype = LatentDType::kFloat32,
                                     int64_t num_blocks = 8) {
  PagedLatentCacheOptions o;
  o.layout = {.num_layers = 3, .latent_dim = 5, .block_tokens = 4, .dtype = dtype};
  o.num_blocks = num_blocks;
  return o;
}

PagedLatentCache MakeCache(const PagedLatentCacheOptions& o) {
  absl::StatusOr<PagedLatentCache> cache = PagedLatentCache::Create(o);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return std::move(cache).value();
}

// A value unique to (layer, position, v); as stored by a cache of `dtype`.
float Tag(LatentDType dtype, int64_t layer, int64_t position, int64_t v) {
  const float x = static_cast<float>(layer * 100000 + position * 100 + v) + 0.5f;
  return dtype == LatentDType::kFloat32 ? x : model::Bf16ToFloat(model::FloatToBf16(x));
}

TEST(PagedLatentLayoutTest, OffsetsAreBlockThenLayerThenSlot) {
  PagedLatentLayout l{
      .num_layers = 61, .latent_dim = 576, .block_tokens = 64, .dtype = LatentDType::kBFloat16};
  EXPECT_EQ(l.row_bytes(), 576 * 2);
  EXPECT_EQ(l.layer_slab_bytes(), 64 * 576 * 2);
  EXPECT_EQ(l.block_bytes(), 61 * 64 * 576 * 2);
  EXPECT_EQ(l.LayerSlabOffset(3, 7), 3 * l.block_bytes() + 7 * l.layer_slab_bytes());
  EXPECT_EQ(l.RowOffset(3, 7, 5), l.LayerSlabOffset(3, 7) + 5 * l.row_bytes());
  // The slab of (block, layer) ends where (block, layer + 1) starts; the last layer's slab ends
  // where the next block starts.
  EXPECT_EQ(l.LayerSlabOffset(2, 60) + l.layer_slab_bytes(), l.LayerSlabOffset(3, 0));
  EXPECT_TRUE(l.Validate().ok());
  l.block_tokens = 0;
  EXPECT_EQ(l.Validate().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PagedLatentCacheTest, CreateRejectsBadOptions) {
  PagedLatentCacheOptions o = SmallOptions();
  o.num_blocks = 0;
  EXPECT_EQ(PagedLatentCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = SmallOptions();
  o.layout.latent_dim = 0;
  EXPECT_EQ(PagedLatentCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  // A caller arena too small for one block.
  std::vector<float> small(10);
  o = SmallOptions();
  o.num_blocks = 0;
  o.arena = small.data();
  o.arena_bytes = static_cast<int64_t>(small.size() * sizeof(float));
  EXPECT_EQ(PagedLatentCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PagedLatentCacheTest, CallerArenaTakesWholeBlocksAndIsWrittenInPlace) {
  PagedLatentCacheOptions o = SmallOptions();
  const int64_t block_bytes = o.layout.block_bytes();
  std::vector<float> arena(static_cast<size_t>(3 * block_bytes / 4 + 7));  // 3 blocks and a bit
  o.num_blocks = 0;
  o.arena = arena.data();
  o.arena_bytes = static_cast<int64_t>(arena.size() * sizeof(float));
  PagedLatentCache cache = MakeCache(o);
  EXPECT_FALSE(cache.owns_arena());
  EXPECT_EQ(cache.num_blocks(), 3);
  EXPECT_EQ(cache.arena_base(), reinterpret_cast<uint8_t*>(arena.data()));
  absl::StatusOr<Reservation> r = cache.Reserve(6);
  ASSERT_TRUE(r.ok()) << r.status();
  // A "remote writer" fills layer 1 of the second block through the documented offset only.
  const BlockId block = r->blocks[1];
  float* slab = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(arena.data()) +
                                         o.layout.LayerSlabOffset(block, 1));
  for (int64_t i = 0; i < o.layout.block_tokens * o.layout.latent_dim; ++i)
    slab[i] = 100.0f + static_cast<float>(i);
  std::vector<float> rows(size_t{6} * 5);
  ASSERT_TRUE(cache.GatherLayer(*cache.Find(r->id), 1, 6, rows.data()).ok());
  // Tokens 4 and 5 are slots 0 and 1 of the second block.
  for (int64_t i = 0; i < 2 * 5; ++i) EXPECT_EQ(rows[20 + i], 100.0f + static_cast<float>(i));
  o.num_blocks = 4;  // more than fit
  EXPECT_EQ(PagedLatentCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PagedLatentCacheTest, ReserveReleaseAccountingReturnsToZero) {
  PagedLatentCache cache = MakeCache(SmallOptions());
  const int64_t block_bytes = cache.layout().block_bytes();
  EXPECT_EQ(cache.blocks_free(), 8);
  EXPECT_EQ(cache.arena_bytes(), 8 * block_bytes);
  absl::StatusOr<Reservation> a = cache.Reserve(5);     // 2 blocks
  absl::StatusOr<Reservation> b = cache.Reserve(4);     // 1 block
  absl::StatusOr<Reservation> c = cache.Reserve(0, 9);  // 3 blocks of headroom, length 0
  absl::StatusOr<Reservation> d = cache.Reserve(0);     // no blocks at all
  ASSERT_TRUE(a.ok() && b.ok() && c.ok() && d.ok());
  EXPECT_EQ(a->blocks.size(), 2u);
  EXPECT_EQ(b->blocks.size(), 1u);
  EXPECT_EQ(c->blocks.size(), 3u);
  EXPECT_TRUE(d->blocks.empty());
  EXPECT_EQ(cache.Find(c->id)->length, 0);
  EXPECT_EQ(cache.blocks_used(), 6);
  EXPECT_EQ(cache.blocks_free(), 2);
  EXPECT_EQ(cache.bytes_used(), 6 * block_bytes);
  EXPECT_EQ(cache.sequences(), 4);
  EXPECT_TRUE(cache.Release(*a).ok());
  EXPECT_TRUE(cache.Release(b->id).ok());
  EXPECT_TRUE(cache.Release(*c).ok());
  EXPECT_TRUE(cache.Release(*d).ok());
  EXPECT_EQ(cache.blocks_used(), 0);
  EXPECT_EQ(cache.bytes_used(), 0);
  EXPECT_EQ(cache.blocks_free(), 8);
  EXPECT_EQ(cache.sequences(), 0);
  EXPECT_EQ(cache.Release(a->id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache.Reserve(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PagedLatentCacheTest, ExhaustionIsAllOrNothing) {
  PagedLatentCache cache = MakeCache(SmallOptions());
  absl::StatusOr<Reservation> a = cache.Reserve(20);  // 5 of 8 blocks
  ASSERT_TRUE(a.ok());
  absl::StatusOr<Reservation> big = cache.Reserve(13);  // 4 blocks, 3 free
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache.blocks_free(), 3);  // nothing was taken
  EXPECT_EQ(cache.sequences(), 1);
  absl::StatusOr<Reservation> fits = cache.Reserve(12);  // exactly 3
  ASSERT_TRUE(fits.ok());
  EXPECT_EQ(cache.blocks_free(), 0);
  // Growth past the last block fails without changing the length.
  const int64_t length = cache.Find(fits->id)->length;
  EXPECT_EQ(cache.AppendToken(fits->id).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache.Find(fits->id)->length, length);
  EXPECT_EQ(cache.AppendToken(999).status().code(), absl::StatusCode::kNotFound);
}

TEST(PagedLatentCacheTest, GenerationFencesStaleReservations) {
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kFloat32, 2));
  absl::StatusOr<Reservation> old = cache.Reserve(8);  // both blocks
  ASSERT_TRUE(old.ok());
  EXPECT_TRUE(cache.Validate(*old).ok());
  const uint64_t g0 = cache.generation(old->blocks[0]);
  ASSERT_TRUE(cache.Release(old->id).ok());
  EXPECT_EQ(cache.generation(old->blocks[0]), g0 + 1);
  EXPECT_EQ(cache.Validate(*old).code(), absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<Reservation> reused = cache.Reserve(8);  // the very same blocks
  ASSERT_TRUE(reused.ok());
  EXPECT_EQ(std::set<BlockId>(reused->blocks.begin(), reused->blocks.end()),
            std::set<BlockId>(old->blocks.begin(), old->blocks.end()));
  EXPECT_TRUE(cache.Validate(*reused).ok());
  EXPECT_EQ(cache.Validate(*old).code(), absl::StatusCode::kFailedPrecondition);
  // A stale reservation cannot free blocks that now belong to someone else.
  EXPECT_EQ(cache.Release(*old).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache.blocks_used(), 2);
  EXPECT_TRUE(cache.Validate(*reused).ok());
  // A forged generation fails too.
  Reservation forged = *reused;
  forged.generations[1] += 7;
  EXPECT_EQ(cache.Validate(forged).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(PagedLatentCacheTest, FreedBlocksAreReusedLast) {
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kFloat32, 3));
  absl::StatusOr<Reservation> a = cache.Reserve(4);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(cache.Release(a->id).ok());
  absl::StatusOr<Reservation> b = cache.Reserve(4);
  ASSERT_TRUE(b.ok());
  EXPECT_NE(b->blocks[0], a->blocks[0]);  // two never-used blocks come first
}

// Writes every row through RowPointer (fp32) and reads every layer back through GatherLayer.
void CheckGather(LatentDType dtype, int64_t tokens) {
  SCOPED_TRACE(::testing::Message()
               << "tokens " << tokens << " bf16 " << (dtype == LatentDType::kBFloat16));
  PagedLatentCache cache = MakeCache(SmallOptions(dtype, 16));
  const PagedLatentLayout& l = cache.layout();
  // Another sequence interleaves, so the blocks of ours are not consecutive.
  absl::StatusOr<Reservation> other = cache.Reserve(1);
  absl::StatusOr<Reservation> r = cache.Reserve(1);
  ASSERT_TRUE(other.ok() && r.ok());
  absl::StatusOr<Reservation> other2 = cache.Reserve(5);
  ASSERT_TRUE(other2.ok());
  // Token 0 came with the reservation; the rest grow one at a time across block boundaries.
  for (int64_t t = 1; t < tokens; ++t) {
    absl::StatusOr<int64_t> pos = cache.AppendToken(r->id);
    ASSERT_TRUE(pos.ok()) << pos.status();
    EXPECT_EQ(*pos, t);
  }
  const BlockTable* table = cache.Find(r->id);
  ASSERT_NE(table, nullptr);
  EXPECT_EQ(table->length, tokens);
  EXPECT_EQ(static_cast<int64_t>(table->blocks.size()), cache.BlocksFor(tokens));
  for (int64_t layer = 0; layer < l.num_layers; ++layer) {
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<float> row(static_cast<size_t>(l.latent_dim));
      for (int64_t v = 0; v < l.latent_dim; ++v) row[v] = Tag(LatentDType::kFloat32, layer, t, v);
      if (dtype == LatentDType::kFloat32) {
        uint8_t* p = cache.RowPointer(*table, layer, t);
        ASSERT_NE(p, nullptr);
        std::memcpy(p, row.data(), row.size() * sizeof(float));
      } else {
        ASSERT_TRUE(cache.StoreRow(*table, layer, t, row.data()).ok());
      }
    }
  }
  for (int64_t layer = 0; layer < l.num_layers; ++layer) {
    std::vector<float> out(static_cast<size_t>(tokens * l.latent_dim), -1.0f);
    ASSERT_TRUE(cache.GatherLayer(*table, layer, tokens, out.data()).ok());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t v = 0; v < l.latent_dim; ++v) {
        ASSERT_EQ(out[t * l.latent_dim + v], Tag(dtype, layer, t, v))
            << "layer " << layer << " t " << t;
      }
      // The row pointer agrees with the gathered row (fp32 only: same bytes).
      if (dtype == LatentDType::kFloat32) {
        EXPECT_EQ(0, std::memcmp(cache.RowPointer(*table, layer, t), out.data() + t * l.latent_dim,
                                 l.row_bytes()));
      }
    }
  }
  EXPECT_EQ(cache.RowPointer(*table, l.num_layers, 0), nullptr);
  EXPECT_EQ(cache.RowPointer(*table, 0, static_cast<int64_t>(table->blocks.size()) * 4), nullptr);
  std::vector<float> too_many(static_cast<size_t>((tokens + 8) * l.latent_dim));
  EXPECT_EQ(cache
                .GatherLayer(*table, 0, static_cast<int64_t>(table->blocks.size()) * 4 + 1,
                             too_many.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PagedLatentCacheTest, GatherEqualsRowsWrittenFp32) {
  for (int64_t tokens : {1, 3, 4, 5, 8, 11}) CheckGather(LatentDType::kFloat32, tokens);
}

TEST(PagedLatentCacheTest, GatherEqualsRowsWrittenBf16) {
  for (int64_t tokens : {1, 3, 4, 5, 8, 11}) CheckGather(LatentDType::kBFloat16, tokens);
}

TEST(PagedLatentCacheTest, Bf16RoundTripRoundsToNearestEven) {
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kBFloat16));
  absl::StatusOr<Reservation> r = cache.Reserve(1);
  ASSERT_TRUE(r.ok());
  const BlockTable* table = cache.Find(r->id);
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 3.0f);
  std::vector<float> row(5), back(5);
  for (int trial = 0; trial < 200; ++trial) {
    for (float& x : row) x = n(rng);
    ASSERT_TRUE(cache.StoreRow(*table, 2, 0, row.data()).ok());
    ASSERT_TRUE(cache.GatherLayer(*table, 2, 1, back.data()).ok());
    for (int v = 0; v < 5; ++v) {
      EXPECT_EQ(back[v], model::Bf16ToFloat(model::FloatToBf16(row[v])));
      EXPECT_LE(std::fabs(back[v] - row[v]), std::fabs(row[v]) * (1.0f / 256));
    }
    // Stored as 2-byte values: the row is half the fp32 size and holds the bf16 bits.
    uint16_t bits;
    std::memcpy(&bits, cache.RowPointer(*table, 2, 0), 2);
    EXPECT_EQ(bits, model::FloatToBf16(row[0]));
  }
}

// Random reserve / append / release; after every step no block has two owners, every live
// table's blocks are exactly those the cache says it owns, and the accounting adds up.
TEST(PagedLatentCacheTest, RandomisedAllocFreeNeverOwnsABlockTwice) {
  // A fresh seed per run, or SPLITMOE_TEST_SEED to replay one; printed either way.
  const char* env = std::getenv("SPLITMOE_TEST_SEED");
  const uint32_t seed = env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10))
                                       : std::random_device{}();
  std::printf(
      "RandomisedAllocFreeNeverOwnsABlockTwice seed %u (replay with SPLITMOE_TEST_SEED=%u)\n", seed,
      seed);
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kFloat32, 32));
  std::vector<Reservation> live;
  std::vector<Reservation> dead;
  for (int step = 0; step < 5000; ++step) {
    const int op = static_cast<int>(rng() % 10);
    if (op < 4) {
      const int64_t tokens = static_cast<int64_t>(rng() % 24);
      const int64_t free_before = cache.blocks_free();
      absl::StatusOr<Reservation> r = cache.Reserve(tokens, static_cast<int64_t>(rng() % 3));
      if (r.ok()) {
        live.push_back(*r);
      } else {
        ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
        ASSERT_EQ(cache.blocks_free(), free_before);
      }
    } else if (op < 7 && !live.empty()) {
      const Reservation& r = live[rng() % live.size()];
      absl::StatusOr<int64_t> pos = cache.AppendToken(r.id);
      ASSERT_TRUE(pos.ok() || pos.status().code() == absl::StatusCode::kResourceExhausted);
    } else if (op < 9 && !live.empty()) {
      const size_t i = rng() % live.size();
      ASSERT_TRUE(rng() % 2 ? cache.Release(live[i]).ok() : cache.Release(live[i].id).ok());
      dead.push_back(live[i]);
      live.erase(live.begin() + static_cast<ptrdiff_t>(i));
    } else if (!dead.empty()) {
      // Stale reservations stay fenced and cannot free anything.
      const Reservation& d = dead[rng() % dead.size()];
      const int64_t used = cache.blocks_used();
      ASSERT_EQ(cache.Validate(d).code(), absl::StatusCode::kFailedPrecondition);
      ASSERT_FALSE(cache.Release(d).ok());
      ASSERT_EQ(cache.blocks_used(), used);
    }
    std::map<BlockId, SequenceId> owner;
    int64_t owned = 0;
    for (const Reservation& r : live) {
      ASSERT_TRUE(cache.Validate(r).ok()) << cache.Validate(r);
      const BlockTable* t = cache.Find(r.id);
      ASSERT_NE(t, nullptr);
      ASSERT_LE(t->length, static_cast<int64_t>(t->blocks.size()) * 4);
      ASSERT_EQ(
          static_cast<int64_t>(t->blocks.size()),
          std::max<int64_t>(static_cast<int64_t>(r.blocks.size()), cache.BlocksFor(t->length)));
      for (BlockId b : t->blocks) {
        ASSERT_GE(b, 0);
        ASSERT_LT(b, 32);
        ASSERT_TRUE(owner.emplace(b, r.id).second) << "block " << b << " owned twice";
        ++owned;
      }
    }
    ASSERT_EQ(owned, cache.blocks_used());
    ASSERT_EQ(cache.blocks_used() + cache.blocks_free(), 32);
    ASSERT_EQ(cache.sequences(), static_cast<int64_t>(live.size()));
  }
  for (const Reservation& r : live) ASSERT_TRUE(cache.Release(r.id).ok());
  EXPECT_EQ(cache.blocks_used(), 0);
}

// ---- the prefix cache: published blocks kept, shared in place, evicted deepest-first ----

std::vector<int32_t> Tokens(std::initializer_list<int32_t> t) { return t; }

TEST(PrefixCacheTest, KeysChainOverWholeBlocks) {
  const auto a = PagedLatentCache::PrefixKeys(Tokens({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}), 4);
  const auto b = PagedLatentCache::PrefixKeys(Tokens({1, 2, 3, 4, 5, 6, 0, 8}), 4);
  const auto c = PagedLatentCache::PrefixKeys(Tokens({9, 2, 3, 4, 5, 6, 7, 8}), 4);
  ASSERT_EQ(a.size(), 2u);  // the partial third block has no key
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(a[0], b[0]);
  EXPECT_NE(a[1], b[1]);
  EXPECT_NE(a[1], c[1]) << "the second block's key depends on the first block";
  for (BlockKey k : a) EXPECT_NE(k, 0u);
}

TEST(PrefixCacheTest, PublishedBlocksOutliveTheirSequenceAndAreSharedInPlace) {
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kFloat32, 8));
  const std::vector<int32_t> prompt = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14};  // 2 blocks + 2
  auto first = cache.ReserveWithPrefix(prompt, 10, 2);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->cached_tokens, 0);
  EXPECT_EQ(first->blocks.size(), 3u);
  const BlockTable* table = cache.Find(first->id);
  ASSERT_NE(table, nullptr);
  float row[5] = {1, 2, 3, 4, 5};
  ASSERT_TRUE(cache.StoreRow(*table, 2, 5, row).ok());  // layer 2, token 5 (block 1)
  ASSERT_TRUE(cache.Publish(first->id, prompt).ok());
  ASSERT_TRUE(cache.Release(first->id).ok());
  EXPECT_EQ(cache.blocks_cached(), 2);       // the two full blocks
  EXPECT_EQ(cache.blocks_free(), 8);         // kept blocks still count as room
  EXPECT_EQ(cache.blocks_used(), 0);
  // The same prompt with another ending: the two blocks are shared, the rest is fresh.
  const std::vector<int32_t> again = {5, 6, 7, 8, 9, 10, 11, 12, 99};
  EXPECT_EQ(cache.CachedPrefixTokens(again, 8), 8);
  auto second = cache.ReserveWithPrefix(again, 9, 4);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->cached_tokens, 8);
  ASSERT_EQ(second->blocks.size(), 4u);
  EXPECT_EQ(second->blocks[0], first->blocks[0]);
  EXPECT_EQ(second->blocks[1], first->blocks[1]);
  EXPECT_EQ(second->generations[1], first->generations[1]) << "kept rows keep their generation";
  EXPECT_TRUE(cache.Validate(*second).ok());
  std::vector<float> rows(6 * 5);
  ASSERT_TRUE(cache.GatherLayer(*cache.Find(second->id), 2, 6, rows.data()).ok());
  EXPECT_EQ(rows[5 * 5 + 4], 5.0f) << "the shared block holds the first sequence's rows";
  EXPECT_EQ(cache.blocks_cached(), 0);
  // A third sequence shares them too; releasing one keeps them held by the other.
  auto third = cache.ReserveWithPrefix(again, 9, 0);
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(third->cached_tokens, 8);
  ASSERT_TRUE(cache.Release(second->id).ok());
  EXPECT_TRUE(cache.Validate(*third).ok());
  EXPECT_EQ(cache.blocks_cached(), 0);
  ASSERT_TRUE(cache.Release(third->id).ok());
  EXPECT_EQ(cache.blocks_cached(), 2);
  EXPECT_EQ(cache.prefix_tokens_hit(), 16);
  EXPECT_EQ(cache.prefix_tokens_queried(), 8 + 8 + 8);
}

TEST(PrefixCacheTest, AtLeastOneTokenIsLeftToComputeAndMismatchesStopTheMatch) {
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kFloat32, 8));
  const std::vector<int32_t> p = {1, 2, 3, 4, 5, 6, 7, 8};
  auto r = cache.ReserveWithPrefix(p, 8, 0);
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(cache.Publish(r->id, p).ok());
  ASSERT_TRUE(cache.Release(r->id).ok());
  // The whole prompt is cached, but its last token must be computed: one block shared.
  EXPECT_EQ(cache.CachedPrefixTokens(p, 7), 4);
  auto same = cache.ReserveWithPrefix(p, 8, 0);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->cached_tokens, 4);
  ASSERT_TRUE(cache.Release(same->id).ok());
  // A different first block matches nothing, even where the second block's tokens agree.
  EXPECT_EQ(cache.CachedPrefixTokens(Tokens({0, 2, 3, 4, 5, 6, 7, 8, 9}), 8), 0);
  EXPECT_EQ(cache.CachedPrefixTokens(Tokens({1, 2, 3, 4, 5, 6, 7, 0, 9}), 8), 4);
}

TEST(PrefixCacheTest, EvictionTakesTheLeastRecentlyKeptDeepestBlockFirstAndFences) {
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kFloat32, 4));
  const std::vector<int32_t> p = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};  // 3 full blocks
  auto r = cache.ReserveWithPrefix(p, 13, 0);  // 4 blocks: the whole cache
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(cache.Publish(r->id, p).ok());
  ASSERT_TRUE(cache.Release(r->id).ok());
  EXPECT_EQ(cache.blocks_cached(), 3);
  EXPECT_EQ(cache.blocks_free(), 4);
  // Two blocks for an unrelated sequence: one free block, then the deepest kept block goes.
  auto other = cache.Reserve(6, 0);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(cache.blocks_evicted(), 1);
  EXPECT_EQ(cache.CachedPrefixTokens(p, 12), 8) << "blocks 0 and 1 are still cached";
  const BlockId evicted = r->blocks[2];
  EXPECT_NE(cache.generation(evicted), r->generations[2]) << "an evicted block is fenced";
  // Everything needed: every kept block is evicted, nothing shared is lost.
  ASSERT_TRUE(cache.Release(other->id).ok());
  auto all = cache.Reserve(16, 0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(cache.blocks_cached(), 0);
  EXPECT_EQ(cache.CachedPrefixTokens(p, 12), 0);
  EXPECT_EQ(cache.Reserve(1, 0).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(cache.Release(all->id).ok());
  EXPECT_EQ(cache.blocks_free(), 4);
}

TEST(PrefixCacheTest, BlocksBeingSharedAreNotRoomAndDuplicatesAreNotKept) {
  PagedLatentCache cache = MakeCache(SmallOptions(LatentDType::kFloat32, 4));
  const std::vector<int32_t> p = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  auto a = cache.ReserveWithPrefix(p, 9, 0);  // 3 blocks
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(cache.Publish(a->id, p).ok());
  ASSERT_TRUE(cache.Release(a->id).ok());
  EXPECT_EQ(cache.blocks_cached(), 2);
  // 2 shared + 2 fresh = the whole cache: the kept blocks it shares cannot also be evicted.
  auto b = cache.ReserveWithPrefix(p, 9, 7);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->cached_tokens, 8);
  EXPECT_EQ(cache.blocks_free(), 0);
  // A third sharer needs one fresh block and none is free.
  EXPECT_EQ(cache.ReserveWithPrefix(p, 9, 0).status().code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(cache.Release(b->id).ok());
  // The same prompt published twice: the second copy's blocks are not kept.
  auto c = cache.Reserve(9, 0);  // fresh blocks, no sharing
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(cache.Publish(c->id, p).ok());
  ASSERT_TRUE(cache.Release(c->id).ok());
  EXPECT_EQ(cache.blocks_cached(), 2);
}

}  // namespace
}  // namespace splitmoe::decode
