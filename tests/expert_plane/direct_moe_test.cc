// The expert data plane's pure parts: how a shard's part of a MoE batch is split over the
// replicas of its pool (SplitByExpert), as seeded random properties.
#include "common/expert_plane/direct_moe.h"

#include <cstdio>
#include <map>
#include <random>
#include <tuple>

#include "gtest/gtest.h"

namespace splitmoe::expert_plane {
namespace {

uint32_t TestSeed(const char* test) {
  const char* env = std::getenv("SPLITMOE_TEST_SEED");
  const uint32_t seed = env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10))
                                       : std::random_device{}();
  std::printf("%s seed %u (replay with SPLITMOE_TEST_SEED=%u)\n", test, seed, seed);
  return seed;
}

// A random shard part: rows ascending, each with 1..k distinct experts of [0, n).
routing::ShardBatch RandomPart(std::mt19937& rng, int rows, int n, int k) {
  routing::ShardBatch b;
  b.shard = 3;
  b.offsets.push_back(0);
  for (int r = 0; r < rows; ++r) {
    if (rng() % 3 == 0) continue;  // not every row of the batch comes here
    b.rows.push_back(r);
    std::vector<int32_t> experts(static_cast<size_t>(n));
    for (int e = 0; e < n; ++e) experts[e] = e;
    std::shuffle(experts.begin(), experts.end(), rng);
    const int m = 1 + static_cast<int>(rng() % k);
    for (int i = 0; i < m; ++i) {
      b.expert_ids.push_back(experts[i]);
      b.weights.push_back(static_cast<float>(rng() % 1000) / 1000.0f);
    }
    b.offsets.push_back(static_cast<int32_t>(b.expert_ids.size()));
  }
  return b;
}

TEST(SplitByExpertTest, EveryAssignmentLandsInExactlyOneShareInOrder) {
  std::mt19937 rng(TestSeed("EveryAssignmentLandsInExactlyOneShareInOrder"));
  for (int iter = 0; iter < 300; ++iter) {
    const int n = 1 + static_cast<int>(rng() % 16);
    const routing::ShardBatch part =
        RandomPart(rng, 1 + static_cast<int>(rng() % 40), n, std::min(n, 6));
    const int groups = 1 + static_cast<int>(rng() % 5);
    const std::vector<routing::ShardBatch> shares = SplitByExpert(part, groups);
    // (row, expert) -> weight, from the part and from the shares together.
    std::map<std::pair<int32_t, int32_t>, float> want, got;
    for (size_t i = 0; i < part.rows.size(); ++i) {
      for (int32_t j = part.offsets[i]; j < part.offsets[i + 1]; ++j)
        want[{part.rows[i], part.expert_ids[j]}] = part.weights[j];
    }
    std::map<int32_t, int> share_of_expert;
    ASSERT_LE(shares.size(), static_cast<size_t>(groups));
    for (size_t s = 0; s < shares.size(); ++s) {
      const routing::ShardBatch& b = shares[s];
      EXPECT_EQ(b.shard, part.shard);
      ASSERT_FALSE(b.rows.empty());
      ASSERT_EQ(b.offsets.size(), b.rows.size() + 1);
      EXPECT_EQ(b.offsets.back(), static_cast<int32_t>(b.expert_ids.size()));
      for (size_t i = 0; i < b.rows.size(); ++i) {
        if (i > 0) {
          EXPECT_LT(b.rows[i - 1], b.rows[i]);  // rows stay ascending
        }
        EXPECT_LT(b.offsets[i], b.offsets[i + 1]);       // no empty row
        for (int32_t j = b.offsets[i]; j < b.offsets[i + 1]; ++j) {
          EXPECT_TRUE(got.emplace(std::make_pair(b.rows[i], b.expert_ids[j]), b.weights[j]).second);
          // An expert goes to one share only (its GEMM stays whole).
          auto [it, fresh] = share_of_expert.emplace(b.expert_ids[j], static_cast<int>(s));
          EXPECT_EQ(it->second, static_cast<int>(s));
        }
      }
    }
    EXPECT_EQ(got, want);
  }
}

TEST(SplitByExpertTest, SharesAreBalancedByTokenCount) {
  // 8 experts with 8, 7, ..., 1 tokens over 2 shares: LPT gives 18 / 18.
  routing::ShardBatch part;
  part.offsets.push_back(0);
  for (int r = 0; r < 8; ++r) {
    part.rows.push_back(r);
    for (int e = 0; e < 8 - r; ++e) {
      part.expert_ids.push_back(e);
      part.weights.push_back(1.0f);
    }
    part.offsets.push_back(static_cast<int32_t>(part.expert_ids.size()));
  }
  const std::vector<routing::ShardBatch> shares = SplitByExpert(part, 2);
  ASSERT_EQ(shares.size(), 2u);
  EXPECT_EQ(shares[0].expert_ids.size(), 18u);
  EXPECT_EQ(shares[1].expert_ids.size(), 18u);
  // One group, or fewer experts than groups: no empty share.
  EXPECT_EQ(SplitByExpert(part, 1).size(), 1u);
  EXPECT_EQ(SplitByExpert(part, 20).size(), 8u);
}

}  // namespace
}  // namespace splitmoe::expert_plane
