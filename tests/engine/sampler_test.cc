#include "common/engine/sampler.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"

namespace splitmoe::engine {
namespace {

TEST(SamplerTest, GreedyTakesArgmaxWithLowerIdOnTies) {
  std::vector<float> logits = {0.1f, 3.0f, 3.0f, -1.0f};
  EXPECT_EQ(SampleToken(logits, SamplingParams{}, 0), 1);
  SamplingParams top1{.temperature = 2.0, .top_p = 1.0, .top_k = 1, .seed = 9};
  EXPECT_EQ(SampleToken(logits, top1, 5), 1);
}

TEST(SamplerTest, CounterUniformIsAFunctionOfSeedAndPosition) {
  EXPECT_EQ(CounterUniform(1, 2), CounterUniform(1, 2));
  EXPECT_NE(CounterUniform(1, 2), CounterUniform(1, 3));
  EXPECT_NE(CounterUniform(1, 2), CounterUniform(2, 2));
  double mean = 0;
  for (uint64_t i = 0; i < 100000; ++i) {
    double u = CounterUniform(7, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    mean += u;
  }
  EXPECT_NEAR(mean / 100000, 0.5, 0.01);
}

TEST(SamplerTest, SamplesFollowTheDistribution) {
  std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  SamplingParams p{.temperature = 1.0, .top_p = 1.0, .top_k = 0, .seed = 3};
  std::map<int32_t, int> counts;
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[SampleToken(logits, p, i)]++;
  EXPECT_NEAR(counts[0] / double(n), 0.5, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.2, 0.02);
  // top_p 0.7 keeps {0, 1} (0.5 + 0.3 >= 0.7) renormalised: 0.625 / 0.375.
  p.top_p = 0.7;
  counts.clear();
  for (int i = 0; i < n; ++i) counts[SampleToken(logits, p, i)]++;
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[0] / double(n), 0.625, 0.02);
  // top_k 1 of 3 is greedy.
  p.top_p = 1.0;
  p.top_k = 1;
  for (int i = 0; i < 100; ++i) EXPECT_EQ(SampleToken(logits, p, i), 0);
}

TEST(SamplerTest, LogprobsAreLogSoftmax) {
  std::vector<float> logits = {1.0f, 2.0f, 3.0f};
  TokenLogprob lp = ComputeLogprob(logits, 0, 2);
  const double z = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  EXPECT_NEAR(lp.logprob, 1.0 - z, 1e-6);
  ASSERT_EQ(lp.top.size(), 2u);
  EXPECT_EQ(lp.top[0].first, 2);
  EXPECT_NEAR(lp.top[0].second, 3.0 - z, 1e-6);
}

TEST(SamplerTest, ValidatesParams) {
  EXPECT_FALSE(ValidateSamplingParams({.temperature = -0.1}).ok());
  EXPECT_FALSE(ValidateSamplingParams({.temperature = NAN}).ok());
  EXPECT_FALSE(ValidateSamplingParams({.temperature = 1, .top_p = 1.5}).ok());
  EXPECT_FALSE(ValidateSamplingParams({.temperature = 1, .top_p = 1, .top_k = -1}).ok());
  EXPECT_TRUE(ValidateSamplingParams({.temperature = 0.7, .top_p = 0.9, .top_k = 40}).ok());
}

}  // namespace
}  // namespace splitmoe::engine
