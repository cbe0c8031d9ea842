// The router's dispatch plan: without a device limit it sends every token exactly the model's
// experts and weights (the union over services is SelectExperts); with a limit of M every token
// touches at most M services; combining the services' partial sums adds them per token.
#include "common/routing/moe_plan.h"

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "common/engine/routing.h"
#include "common/routing/expert_routing.h"
#include "gtest/gtest.h"

namespace splitmoe::routing {
namespace {

model::ModelConfig V3() {
  model::ModelConfig c;
  c.hidden_size = 4;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.topk_method = model::TopkMethod::kNoauxTc;
  c.scoring_func = model::ScoringFunc::kSigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  return c;
}

TEST(MoePlanTest, WithoutALimitEveryTokenGetsTheModelsSelection) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0, 1);
  const model::ModelConfig c = V3();
  const int64_t tokens = 50;
  std::vector<float> scores(tokens * 16), bias(16);
  for (float& s : scores) s = u(rng);
  for (float& b : bias) b = (u(rng) - 0.5f) * 0.1f;
  std::vector<int32_t> to_shard(16);
  for (int e = 0; e < 16; ++e) to_shard[e] = e % 3;  // interleaved, 3 services
  auto plan = PlanDispatch(c, scores, tokens, bias, to_shard, 3);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::map<int32_t, std::map<int32_t, float>> got;  // token -> expert -> weight
  for (const ShardBatch& b : *plan) {
    ASSERT_EQ(b.offsets.size(), b.rows.size() + 1);
    for (size_t i = 0; i < b.rows.size(); ++i) {
      for (int32_t j = b.offsets[i]; j < b.offsets[i + 1]; ++j) {
        EXPECT_EQ(to_shard[b.expert_ids[j]], b.shard);
        got[b.rows[i]][b.expert_ids[j]] = b.weights[j];
      }
    }
  }
  for (int64_t t = 0; t < tokens; ++t) {
    engine::ExpertChoice want =
        engine::SelectExperts(c, absl::MakeConstSpan(scores.data() + t * 16, 16), bias);
    ASSERT_EQ(got[t].size(), want.experts.size());
    for (size_t i = 0; i < want.experts.size(); ++i)
      EXPECT_EQ(got[t][want.experts[i]], want.weights[i]);
  }
}

TEST(MoePlanTest, DeviceLimitBoundsTheServicesATokenTouches) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(0, 1);
  const model::ModelConfig c = V3();
  const int64_t tokens = 40;
  std::vector<float> scores(tokens * 16);
  for (float& s : scores) s = u(rng);
  std::vector<int32_t> to_shard(16);
  for (int e = 0; e < 16; ++e) to_shard[e] = e / 4;  // 4 services, 4 experts each
  for (int32_t m : {1, 2}) {
    auto plan = PlanDispatch(c, scores, tokens, {}, to_shard, 4, m);
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::map<int32_t, std::set<int32_t>> services;
    std::map<int32_t, int> experts;
    for (const ShardBatch& b : *plan) {
      for (size_t i = 0; i < b.rows.size(); ++i) {
        services[b.rows[i]].insert(b.shard);
        experts[b.rows[i]] += b.offsets[i + 1] - b.offsets[i];
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      EXPECT_LE(services[t].size(), static_cast<size_t>(m)) << "token " << t;
      EXPECT_EQ(experts[t], 4) << "token " << t;
    }
  }
}

// Redundant copies (EPLB): the selection is unchanged (every token gets the same experts and
// weights as without copies), every assignment lands on a shard holding a copy of its expert,
// and with a device limit a token never uses more shards than its primaries.
TEST(MoePlanTest, CopiesChangeOnlyWhereAssignmentsGo) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0, 1);
  const model::ModelConfig c = V3();
  const int64_t tokens = 64;
  for (int round = 0; round < 20; ++round) {
    std::vector<float> scores(tokens * 16);
    for (float& s : scores) s = u(rng);
    std::vector<int32_t> primary(16);
    std::vector<std::vector<int32_t>> copies(16);
    for (int e = 0; e < 16; ++e) {
      primary[e] = e / 4;
      copies[e] = {primary[e]};
      for (int32_t s = 0; s < 4; ++s) {
        if (s != primary[e] && rng() % 3 == 0) copies[e].push_back(s);
      }
    }
    for (int32_t m : {0, 2, 1}) {
      auto plain = PlanDispatch(c, scores, tokens, {}, primary, 4, m);
      auto copied = PlanDispatch(c, scores, tokens, {}, primary, 4, m, copies);
      ASSERT_TRUE(plain.ok() && copied.ok());
      auto by_token = [](const std::vector<ShardBatch>& plan) {
        std::map<int32_t, std::set<std::pair<int32_t, float>>> out;
        for (const ShardBatch& b : plan) {
          for (size_t i = 0; i < b.rows.size(); ++i)
            for (int32_t j = b.offsets[i]; j < b.offsets[i + 1]; ++j)
              out[b.rows[i]].insert({b.expert_ids[j], b.weights[j]});
        }
        return out;
      };
      EXPECT_EQ(by_token(*plain), by_token(*copied)) << "M " << m;
      std::map<int32_t, std::set<int32_t>> shards, primaries;
      for (const ShardBatch& b : *copied) {
        for (size_t i = 0; i < b.rows.size(); ++i) {
          shards[b.rows[i]].insert(b.shard);
          for (int32_t j = b.offsets[i]; j < b.offsets[i + 1]; ++j) {
            const auto& on = copies[b.expert_ids[j]];
            EXPECT_NE(std::find(on.begin(), on.end(), b.shard), on.end());
            primaries[b.rows[i]].insert(primary[b.expert_ids[j]]);
          }
        }
      }
      if (m > 0) {
        for (const auto& [t, used] : shards) {
          EXPECT_LE(used.size(), primaries[t].size()) << "token " << t;
          EXPECT_LE(used.size(), static_cast<size_t>(m)) << "token " << t;
        }
      }
    }
  }
  std::vector<int32_t> primary(16, 0);
  std::vector<std::vector<int32_t>> wrong(16, std::vector<int32_t>{1});  // primary not first
  std::vector<float> scores(16, 0.5f);
  EXPECT_FALSE(PlanDispatch(c, scores, 1, {}, primary, 4, 0, wrong).ok());
}

// With shards aligned to the expert groups and M = topk_group, device-limited routing is the
// model's own selection exactly (and the plan takes the cheap path to it); M below topk_group
// still binds.
TEST(MoePlanTest, GroupAlignedPlacementWithMTopkGroupIsTheModelsRouting) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0, 1);
  model::ModelConfig c = V3();
  c.n_routed_experts = 64;
  c.num_experts_per_tok = 6;
  c.n_group = 8;
  c.topk_group = 3;
  const int64_t tokens = 200;
  std::vector<float> scores(tokens * 64), bias(64);
  for (float& s : scores) s = u(rng);
  for (float& b : bias) b = (u(rng) - 0.5f) * 0.1f;
  for (int shards : {8, 4, 2}) {
    std::vector<int32_t> to_shard(64);
    for (int e = 0; e < 64; ++e) to_shard[e] = e / (64 / shards);
    ASSERT_TRUE(GroupAligned(c, to_shard));
    auto limited = PlanDispatch(c, scores, tokens, bias, to_shard, shards, 3);
    auto exact = PlanDispatch(c, scores, tokens, bias, to_shard, shards, 0);
    ASSERT_TRUE(limited.ok() && exact.ok());
    ASSERT_EQ(limited->size(), exact->size());
    for (size_t i = 0; i < exact->size(); ++i) {
      EXPECT_EQ((*limited)[i].rows, (*exact)[i].rows);
      EXPECT_EQ((*limited)[i].expert_ids, (*exact)[i].expert_ids);
      EXPECT_EQ((*limited)[i].weights, (*exact)[i].weights);
    }
    // The general device-limited selection agrees token by token.
    auto placement = ExpertPlacement::FromAssignment(to_shard, shards);
    ASSERT_TRUE(placement.ok());
    for (int64_t t = 0; t < tokens; ++t) {
      absl::Span<const float> row = absl::MakeConstSpan(scores).subspan(t * 64, 64);
      auto general = DeviceLimitedTopK(c, row, bias, *placement, 3);
      ASSERT_TRUE(general.ok());
      EXPECT_EQ(general->experts, engine::SelectExperts(c, row, bias).experts) << "token " << t;
      EXPECT_LE(DevicesTouched(general->experts, *placement), 3);
    }
  }
  // Not aligned (a group split over two shards): the limit is applied for real.
  std::vector<int32_t> split(64);
  for (int e = 0; e < 64; ++e) split[e] = (e + 4) / 8 % 8;
  EXPECT_FALSE(GroupAligned(c, split));
  auto limited = PlanDispatch(c, scores, tokens, bias, split, 8, 2);
  ASSERT_TRUE(limited.ok());
  std::map<int32_t, std::set<int32_t>> shards_of_row;
  for (const ShardBatch& b : *limited) {
    for (int32_t r : b.rows) shards_of_row[r].insert(b.shard);
  }
  for (const auto& [row, s] : shards_of_row) EXPECT_LE(s.size(), 2u) << "row " << row;
}

TEST(MoePlanTest, CombineAddsPartialSumsPerToken) {
  ShardBatch b;
  b.rows = {0, 2};
  std::vector<float> out(3 * 2, 1.0f), partial = {1, 2, 3, 4};
  CombineShardOutput(b, partial, 2, absl::MakeSpan(out));
  EXPECT_EQ(out, (std::vector<float>{2, 3, 1, 1, 4, 5}));
}

TEST(MoePlanTest, RefusesInconsistentInput) {
  const model::ModelConfig c = V3();
  std::vector<float> scores(10);
  std::vector<int32_t> to_shard(16, 0);
  EXPECT_FALSE(PlanDispatch(c, scores, 2, {}, to_shard, 1).ok());
  std::vector<float> ok_scores(16, 0.5f);
  std::vector<int32_t> bad(16, 5);
  EXPECT_FALSE(PlanDispatch(c, ok_scores, 1, {}, bad, 2).ok());
}

}  // namespace
}  // namespace splitmoe::routing
