// EPLB placement: every expert has a copy, no shard holds more than its slots nor two copies of
// one expert, homes stay where fixed, the redundant copies go to the hottest experts, and the
// expected MaxVio per shard falls on skewed loads (random loads, many seeds).
#include "common/routing/eplb.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "gtest/gtest.h"

namespace splitmoe::routing {
namespace {

void ExpectValid(const LayerPlacement& p, int32_t experts, int32_t shards, int32_t slots) {
  ASSERT_EQ(static_cast<int32_t>(p.expert_shards.size()), experts);
  ASSERT_EQ(static_cast<int32_t>(p.shard_experts.size()), shards);
  int64_t copies = 0;
  for (int32_t e = 0; e < experts; ++e) {
    const auto& on = p.expert_shards[static_cast<size_t>(e)];
    ASSERT_FALSE(on.empty()) << "expert " << e << " has no copy";
    EXPECT_EQ(std::set<int32_t>(on.begin(), on.end()).size(), on.size())
        << "expert " << e << " twice on one shard";
    for (int32_t s : on) {
      ASSERT_GE(s, 0);
      ASSERT_LT(s, shards);
      const auto& here = p.shard_experts[static_cast<size_t>(s)];
      EXPECT_TRUE(std::binary_search(here.begin(), here.end(), e)) << e << " on " << s;
    }
    copies += static_cast<int64_t>(on.size());
  }
  int64_t listed = 0;
  for (const auto& here : p.shard_experts) {
    EXPECT_LE(static_cast<int32_t>(here.size()), slots);
    EXPECT_TRUE(std::is_sorted(here.begin(), here.end()));
    listed += static_cast<int64_t>(here.size());
  }
  EXPECT_EQ(listed, copies);
}

TEST(EplbTest, ContiguousIsTheDefault) {
  LayerPlacement p = ContiguousPlacement(16, 4);
  ExpectValid(p, 16, 4, 4);
  for (int32_t e = 0; e < 16; ++e) EXPECT_EQ(p.expert_shards[e], std::vector<int32_t>{e / 4});
  EXPECT_DOUBLE_EQ(ExpectedMaxVio(std::vector<double>(16, 3.0), p), 0.0);
}

TEST(EplbTest, RandomSkewedLoadsArePlacedValidlyAndMoreEvenly) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  double sum_packed[2] = {0, 0}, sum_fixed[2] = {0, 0};  // MaxVio before, after
  for (int round = 0; round < 200; ++round) {
    const int32_t shards = 2 + static_cast<int32_t>(rng() % 7);
    const int32_t per = 1 + static_cast<int32_t>(rng() % 8);
    const int32_t experts = shards * per;
    const int32_t slots = per + static_cast<int32_t>(rng() % 3);
    std::vector<double> load(static_cast<size_t>(experts));
    std::exponential_distribution<double> hot(0.5);
    for (double& l : load) l = std::pow(hot(rng), 3);  // a few experts carry most of it
    const bool fixed = rng() % 2 == 0;
    const LayerPlacement contiguous = ContiguousPlacement(experts, shards);
    std::vector<int32_t> homes;
    if (fixed) {
      for (int32_t e = 0; e < experts; ++e) homes.push_back(contiguous.expert_shards[e][0]);
    }
    auto p = BalancedPlacement(load, shards, slots, homes);
    ASSERT_TRUE(p.ok()) << p.status();
    ExpectValid(*p, experts, shards, slots);
    if (fixed) {
      for (int32_t e = 0; e < experts; ++e) EXPECT_EQ(p->expert_shards[e][0], homes[e]);
    }
    const double before = ExpectedMaxVio(load, contiguous), after = ExpectedMaxVio(load, *p);
    (fixed ? sum_fixed : sum_packed)[0] += before;
    (fixed ? sum_fixed : sum_packed)[1] += after;
    if (!fixed) {
      // Copies go to the hottest first: the hottest expert has (within a tie) the most.
      const size_t hot = static_cast<size_t>(std::max_element(load.begin(), load.end()) - load.begin());
      for (int32_t e = 0; e < experts; ++e)
        EXPECT_LE(p->expert_shards[e].size(), p->expert_shards[hot].size() + 1) << "expert " << e;
    }
  }
  // Greedy packing is not optimal on every instance, but over many it evens the shards out.
  EXPECT_LT(sum_packed[1], 0.5 * sum_packed[0]);
  EXPECT_LT(sum_fixed[1], sum_fixed[0]);
}

TEST(EplbTest, OneHotExpertIsSpreadOverEveryShard) {
  std::vector<double> load(8, 1.0);
  load[3] = 100.0;
  auto p = BalancedPlacement(load, 4, 3, {});  // 12 slots, 4 spare
  ASSERT_TRUE(p.ok());
  ExpectValid(*p, 8, 4, 3);
  EXPECT_EQ(p->expert_shards[3].size(), 4u);  // every shard
  EXPECT_GT(ExpectedMaxVio(load, ContiguousPlacement(8, 4)), 2.0);
  EXPECT_LT(ExpectedMaxVio(load, *p), 0.1);
}

TEST(EplbTest, NoLoadIsUniformAndBadInputIsRefused) {
  auto p = BalancedPlacement(std::vector<double>(12, 0.0), 3, 4, {});
  ASSERT_TRUE(p.ok());
  ExpectValid(*p, 12, 3, 4);
  EXPECT_FALSE(BalancedPlacement(std::vector<double>(12, 1.0), 3, 3, {}).ok());  // 9 < 12 slots
  EXPECT_FALSE(BalancedPlacement({1.0, -1.0}, 2, 1, {}).ok());
  EXPECT_FALSE(BalancedPlacement({1.0, 1.0}, 2, 1, {0}).ok());     // homes of the wrong size
  EXPECT_FALSE(BalancedPlacement({1.0, 1.0}, 2, 1, {0, 0}).ok());  // home 0 over its slots
  EXPECT_FALSE(BalancedPlacement({1.0, 1.0}, 2, 1, {0, 5}).ok());
}

}  // namespace
}  // namespace splitmoe::routing
