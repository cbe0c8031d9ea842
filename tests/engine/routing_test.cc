#include "common/engine/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "gtest/gtest.h"

namespace splitmoe::engine {
namespace {

using model::ModelConfig;
using model::ScoringFunc;
using model::TopkMethod;

ModelConfig V3Routing() {
  ModelConfig c;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.topk_method = TopkMethod::kNoauxTc;
  c.scoring_func = ScoringFunc::kSigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  return c;
}

TEST(RoutingTest, BiasSelectsButDoesNotWeigh) {
  ModelConfig c = V3Routing();
  c.n_group = 1;
  c.topk_group = 1;
  c.num_experts_per_tok = 2;
  std::vector<float> scores(16, 0.1f);
  scores[0] = 0.9f;
  scores[1] = 0.8f;
  std::vector<float> bias(16, 0.0f);
  bias[5] = 1.0f;  // expert 5 has a low score but a large bias
  ExpertChoice choice = SelectExperts(c, scores, bias);
  ASSERT_EQ(choice.experts, (std::vector<int32_t>{5, 0}));
  // Weights come from the unbiased scores (0.1 and 0.9), normalised, times 2.5.
  EXPECT_FLOAT_EQ(choice.weights[0], 0.1f / 1.0f * 2.5f);
  EXPECT_FLOAT_EQ(choice.weights[1], 0.9f / 1.0f * 2.5f);
}

TEST(RoutingTest, NoauxTcScoresGroupsByTopTwoSum) {
  ModelConfig c = V3Routing();
  c.topk_group = 1;
  c.num_experts_per_tok = 2;
  std::vector<float> s(16, 0.0f);
  // Group 0 has the single best expert; group 1 has the best pair.
  s[0] = 0.9f;
  s[1] = 0.1f;
  s[4] = 0.6f;
  s[5] = 0.6f;
  ExpertChoice choice = SelectExperts(c, s, {});
  EXPECT_EQ(choice.experts, (std::vector<int32_t>{4, 5}));
  // group_limited_greedy scores groups by their max instead: group 0 wins.
  c.topk_method = TopkMethod::kGroupLimitedGreedy;
  choice = SelectExperts(c, s, {});
  EXPECT_EQ(choice.experts, (std::vector<int32_t>{0, 1}));
}

TEST(RoutingTest, TiesGoToLowerIndex) {
  ModelConfig c = V3Routing();
  std::vector<float> s(16, 0.5f);
  ExpertChoice choice = SelectExperts(c, s, {});
  EXPECT_EQ(choice.experts, (std::vector<int32_t>{0, 1, 2, 3}));
  c.topk_method = TopkMethod::kGreedy;
  choice = SelectExperts(c, s, {});
  EXPECT_EQ(choice.experts, (std::vector<int32_t>{0, 1, 2, 3}));
}

TEST(RoutingTest, SoftmaxWithoutNormalisationKeepsRawWeights) {
  ModelConfig c;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.topk_method = TopkMethod::kGreedy;
  c.scoring_func = ScoringFunc::kSoftmax;
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 16.0;
  std::vector<float> s = {0.05f, 0.3f, 0.05f, 0.2f, 0.1f, 0.1f, 0.1f, 0.1f};
  ExpertChoice choice = SelectExperts(c, s, {});
  EXPECT_EQ(choice.experts, (std::vector<int32_t>{1, 3}));
  EXPECT_FLOAT_EQ(choice.weights[0], 0.3f * 16);
  EXPECT_FLOAT_EQ(choice.weights[1], 0.2f * 16);
}

// Brute force: all subsets of topk_group groups; the best experts inside the best subset.
TEST(RoutingTest, RandomisedGroupLimitProperty) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (TopkMethod method : {TopkMethod::kNoauxTc, TopkMethod::kGroupLimitedGreedy}) {
    ModelConfig c = V3Routing();
    c.topk_method = method;
    const int per_group = 4;
    for (int trial = 0; trial < 500; ++trial) {
      std::vector<float> s(16), bias(16);
      for (float& x : s) x = u(rng);
      for (float& b : bias) b = (u(rng) - 0.5f) * 0.2f;
      ExpertChoice choice = SelectExperts(c, s, bias);
      ASSERT_EQ(choice.experts.size(), 4u);
      std::set<int> groups;
      for (int32_t e : choice.experts) groups.insert(e / per_group);
      EXPECT_LE(groups.size(), 2u);
      // Selection order is by biased (noaux_tc) or raw score, descending.
      std::vector<float> sel = s;
      if (method == TopkMethod::kNoauxTc)
        for (int e = 0; e < 16; ++e) sel[e] += bias[e];
      for (size_t i = 1; i < choice.experts.size(); ++i) {
        EXPECT_GE(sel[choice.experts[i - 1]], sel[choice.experts[i]]);
      }
      // Weights: unbiased scores, normalised, scaled.
      float sum = 0;
      for (int32_t e : choice.experts) sum += s[e];
      for (size_t i = 0; i < choice.experts.size(); ++i) {
        EXPECT_NEAR(choice.weights[i], s[choice.experts[i]] / sum * 2.5f, 1e-6);
      }
      // The kept groups are the two with the best group score.
      std::vector<std::pair<float, int>> gs;
      for (int g = 0; g < 4; ++g) {
        std::vector<float> m(sel.begin() + g * per_group, sel.begin() + (g + 1) * per_group);
        std::sort(m.rbegin(), m.rend());
        gs.push_back({method == TopkMethod::kNoauxTc ? m[0] + m[1] : m[0], g});
      }
      std::sort(gs.begin(), gs.end(), [](auto a, auto b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      for (int g : groups) EXPECT_TRUE(g == gs[0].second || g == gs[1].second);
      // Within the kept groups, no unchosen expert beats a chosen one.
      float worst_chosen = 1e9;
      for (int32_t e : choice.experts) worst_chosen = std::min(worst_chosen, sel[e]);
      for (int e = 0; e < 16; ++e) {
        int g = e / per_group;
        if ((g == gs[0].second || g == gs[1].second) &&
            std::find(choice.experts.begin(), choice.experts.end(), e) == choice.experts.end()) {
          EXPECT_LE(sel[e], worst_chosen);
        }
      }
    }
  }
}

// The plain definition of the selection (what SelectExperts computed before its fast paths):
// biased copy, group scores, -inf outside the kept groups, a full partial sort.
std::vector<int32_t> ReferenceSelect(const ModelConfig& c, const std::vector<float>& scores,
                                     const std::vector<float>& bias) {
  const int64_t n = static_cast<int64_t>(scores.size());
  auto top = [](const std::vector<float>& v, int64_t k) {
    std::vector<int32_t> idx(v.size());
    for (size_t i = 0; i < v.size(); ++i) idx[i] = static_cast<int32_t>(i);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
      return v[a] != v[b] ? v[a] > v[b] : a < b;
    });
    idx.resize(static_cast<size_t>(k));
    return idx;
  };
  std::vector<float> choice = scores;
  if (c.HasScoreBias() && !bias.empty()) {
    for (int64_t e = 0; e < n; ++e) choice[e] += bias[e];
  }
  if (c.UsesGroups()) {
    const int64_t per = n / c.n_group;
    std::vector<float> g(static_cast<size_t>(c.n_group));
    for (int64_t j = 0; j < c.n_group; ++j) {
      std::vector<float> m(choice.begin() + j * per, choice.begin() + (j + 1) * per);
      std::vector<int32_t> t = top(m, c.topk_method == TopkMethod::kNoauxTc ? 2 : 1);
      g[j] = c.topk_method == TopkMethod::kNoauxTc ? m[t[0]] + m[t[1]] : m[t[0]];
    }
    std::vector<int32_t> kept = top(g, c.topk_group);
    for (int64_t e = 0; e < n; ++e) {
      if (std::find(kept.begin(), kept.end(), e / per) == kept.end())
        choice[e] = -std::numeric_limits<float>::infinity();
    }
  }
  return top(choice, c.num_experts_per_tok);
}

// SelectExperts (with its vectorised path where the shape allows) equals the plain definition
// bit for bit, on V3's and V2's shapes and others, with many exact ties.
TEST(RoutingTest, SelectionEqualsThePlainDefinition) {
  std::mt19937 rng(11);
  struct Shape {
    TopkMethod method;
    int64_t n, k, groups, kept;
  };
  const Shape shapes[] = {{TopkMethod::kNoauxTc, 256, 8, 8, 4},
                          {TopkMethod::kGroupLimitedGreedy, 160, 6, 8, 3},
                          {TopkMethod::kNoauxTc, 64, 6, 8, 4},
                          {TopkMethod::kNoauxTc, 16, 4, 4, 2},
                          {TopkMethod::kNoauxTc, 64, 8, 8, 1},
                          {TopkMethod::kGreedy, 64, 6, 1, 1},
                          // The AVX2 paths: eight groups scored at once (top-2 sum and max),
                          // and sixteen groups one at a time.
                          {TopkMethod::kGroupLimitedGreedy, 256, 6, 8, 3},
                          {TopkMethod::kNoauxTc, 256, 8, 16, 4},
                          {TopkMethod::kGroupLimitedGreedy, 128, 8, 16, 5}};
  for (const Shape& sh : shapes) {
    ModelConfig c = V3Routing();
    c.topk_method = sh.method;
    c.n_routed_experts = sh.n;
    c.num_experts_per_tok = sh.k;
    c.n_group = sh.groups;
    c.topk_group = sh.kept;
    for (int iter = 0; iter < 2000; ++iter) {
      std::vector<float> scores(static_cast<size_t>(sh.n)), bias(static_cast<size_t>(sh.n));
      // Few distinct values: ties everywhere (also between group scores).
      const int levels = iter % 3 == 0 ? 4 : 1000;
      for (float& v : scores) v = static_cast<float>(rng() % levels) / levels;
      for (float& v : bias) v = iter % 2 ? 0.0f : static_cast<float>(rng() % 5) / 100.0f;
      const ExpertChoice got = SelectExperts(c, scores, bias);
      ASSERT_EQ(got.experts, ReferenceSelect(c, scores, bias))
          << "n " << sh.n << " k " << sh.k << " groups " << sh.groups << " iter " << iter;
      ASSERT_EQ(got.weights, GateWeights(c, scores, got.experts));
    }
  }
}

TEST(RoutingTest, GateScoresSigmoidAndSoftmax) {
  ModelConfig c = V3Routing();
  model::Matrix gate{2, 3, {1, 0, 0, 0, 1, 0}};
  std::vector<float> x = {0.5f, -1.0f, 2.0f};
  std::vector<float> s(2);
  GateScores(c, x.data(), 1, gate, s.data());
  EXPECT_NEAR(s[0], 1 / (1 + std::exp(-0.5)), 1e-6);
  EXPECT_NEAR(s[1], 1 / (1 + std::exp(1.0)), 1e-6);
  c.scoring_func = ScoringFunc::kSoftmax;
  GateScores(c, x.data(), 1, gate, s.data());
  EXPECT_NEAR(s[0], std::exp(0.5) / (std::exp(0.5) + std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(s[0] + s[1], 1.0, 1e-6);
}

}  // namespace
}  // namespace splitmoe::engine
