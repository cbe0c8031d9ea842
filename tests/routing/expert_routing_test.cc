#include "common/routing/expert_routing.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace splitmoe::routing {
namespace {

using engine::ExpertChoice;
using model::ModelConfig;
using model::ScoringFunc;
using model::TopkMethod;

// A fresh seed per run, or SPLITMOE_TEST_SEED to replay one; printed either way.
uint32_t TestSeed(const char* test) {
  const char* env = std::getenv("SPLITMOE_TEST_SEED");
  const uint32_t seed = env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10))
                                       : std::random_device{}();
  std::printf("%s seed %u (replay with SPLITMOE_TEST_SEED=%u)\n", test, seed, seed);
  return seed;
}

ModelConfig Config(TopkMethod method, int64_t n, int64_t k, int64_t groups, int64_t topk_group) {
  ModelConfig c;
  c.n_routed_experts = n;
  c.num_experts_per_tok = k;
  c.topk_method = method;
  c.n_group = groups;
  c.topk_group = topk_group;
  if (method == TopkMethod::kNoauxTc) {
    c.scoring_func = ScoringFunc::kSigmoid;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
  } else {
    c.scoring_func = ScoringFunc::kSoftmax;
    c.norm_topk_prob = method == TopkMethod::kGroupLimitedGreedy;
    c.routed_scaling_factor = method == TopkMethod::kGreedy ? 1.0 : 16.0;
  }
  return c;
}

// The model shapes the property tests walk through: V3-like (noaux_tc, 32 experts in 8 groups),
// V2-like (group_limited_greedy), V2-Lite-like (greedy).
std::vector<ModelConfig> Configs() {
  return {Config(TopkMethod::kNoauxTc, 32, 8, 8, 4), Config(TopkMethod::kNoauxTc, 16, 4, 1, 1),
          Config(TopkMethod::kGroupLimitedGreedy, 32, 6, 8, 3),
          Config(TopkMethod::kGreedy, 24, 6, 1, 1), Config(TopkMethod::kNoauxTc, 24, 2, 4, 2)};
}

void RandomToken(const ModelConfig& c, std::mt19937& rng, std::vector<float>* scores,
                 std::vector<float>* bias) {
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::normal_distribution<float> g(0.0f, 1.0f);
  scores->resize(static_cast<size_t>(c.n_routed_experts));
  if (c.scoring_func == ScoringFunc::kSigmoid) {
    for (float& s : *scores) s = 1.0f / (1.0f + std::exp(-2.0f * g(rng)));
  } else {
    float sum = 0.0f;
    for (float& s : *scores) sum += (s = std::exp(2.0f * g(rng)));
    for (float& s : *scores) s /= sum;
  }
  bias->resize(static_cast<size_t>(c.n_routed_experts));
  for (float& b : *bias) b = (u(rng) - 0.5f) * 0.3f;
}

// A random placement of n experts on d devices, each device hosting at least min_each.
ExpertPlacement RandomPlacement(int64_t n, int32_t d, int64_t min_each, std::mt19937& rng) {
  std::vector<int32_t> assign;
  for (int32_t dev = 0; dev < d; ++dev)
    assign.insert(assign.end(), static_cast<size_t>(min_each), dev);
  while (static_cast<int64_t>(assign.size()) < n) assign.push_back(static_cast<int32_t>(rng() % d));
  std::shuffle(assign.begin(), assign.end(), rng);
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromAssignment(assign, d);
  EXPECT_TRUE(p.ok()) << p.status();
  return *std::move(p);
}

// Plain reference of device-limited routing, written from the definition: group mask, device
// affinity over the kept experts, the best M devices, the best k kept experts there (filled
// from the masked ones on those devices only if too few).
std::vector<int32_t> ReferenceDeviceLimited(const ModelConfig& c, const std::vector<float>& s,
                                            const std::vector<float>& bias,
                                            const ExpertPlacement& p, int32_t m,
                                            DeviceAffinity affinity) {
  const int64_t n = c.n_routed_experts, k = c.num_experts_per_tok;
  std::vector<float> v(s);
  if (c.topk_method == TopkMethod::kNoauxTc) {
    for (int64_t e = 0; e < n; ++e) v[e] += bias[e];
  }
  std::vector<bool> kept(static_cast<size_t>(n), true);
  if (c.n_group > 1 && c.topk_method != TopkMethod::kGreedy) {
    const int64_t per = n / c.n_group;
    std::vector<std::pair<float, int64_t>> gs;
    for (int64_t g = 0; g < c.n_group; ++g) {
      std::vector<float> m2(v.begin() + g * per, v.begin() + (g + 1) * per);
      std::sort(m2.rbegin(), m2.rend());
      gs.push_back({c.topk_method == TopkMethod::kNoauxTc ? m2[0] + m2[1] : m2[0], g});
    }
    std::sort(gs.begin(), gs.end(), [](auto a, auto b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    std::set<int64_t> keep_groups;
    for (int64_t i = 0; i < c.topk_group; ++i) keep_groups.insert(gs[i].second);
    for (int64_t e = 0; e < n; ++e) kept[e] = keep_groups.count(e / per) > 0;
  }
  const int32_t dm = std::min(m, p.num_devices());
  const int64_t terms = affinity == DeviceAffinity::kMaxExpert ? 1 : (k + dm - 1) / dm;
  std::vector<std::pair<float, int32_t>> dev;
  for (int32_t d = 0; d < p.num_devices(); ++d) {
    std::vector<float> vals;
    for (int32_t e : p.experts_on(d)) {
      if (kept[e]) vals.push_back(v[e]);
    }
    std::sort(vals.rbegin(), vals.rend());
    float a = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < std::min<int64_t>(terms, static_cast<int64_t>(vals.size())); ++i)
      a = i == 0 ? vals[0] : a + vals[i];
    dev.push_back({a, d});
  }
  std::sort(dev.begin(), dev.end(), [](auto a, auto b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::set<int32_t> chosen;
  for (int32_t i = 0; i < dm; ++i) chosen.insert(dev[i].second);
  std::vector<int32_t> cand;
  for (int32_t e = 0; e < n; ++e) {
    if (chosen.count(p.device_of(e)) > 0) cand.push_back(e);
  }
  std::sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) {
    if (kept[a] != kept[b]) return static_cast<bool>(kept[a]);
    if (kept[a] && v[a] != v[b]) return v[a] > v[b];
    return a < b;  // masked experts: by index, as SelectExperts's -inf ties
  });
  cand.resize(static_cast<size_t>(k));
  return cand;
}

// ---------------------------------------------------------------------------------------------

TEST(ExpertPlacementTest, ContiguousSpreadsTheRemainderOverTheFirstDevices) {
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(10, 4);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_devices(), 4);
  EXPECT_EQ(std::vector<int32_t>(p->expert_to_device().begin(), p->expert_to_device().end()),
            (std::vector<int32_t>{0, 0, 0, 1, 1, 1, 2, 2, 3, 3}));
  EXPECT_EQ(std::vector<int32_t>(p->experts_on(1).begin(), p->experts_on(1).end()),
            (std::vector<int32_t>{3, 4, 5}));
  EXPECT_EQ(p->MinExpertsOn(1), 2);
  EXPECT_EQ(p->MinExpertsOn(3), 7);
  EXPECT_EQ(p->MinExpertsOn(9), 10);
  absl::StatusOr<ExpertPlacement> even = ExpertPlacement::Contiguous(160, 8);
  ASSERT_TRUE(even.ok());
  for (int32_t d = 0; d < 8; ++d) {
    ASSERT_EQ(even->experts_on(d).size(), 20u);
    EXPECT_EQ(even->experts_on(d)[0], 20 * d);
  }
}

TEST(ExpertPlacementTest, Validation) {
  EXPECT_EQ(ExpertPlacement::Contiguous(4, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpertPlacement::Contiguous(4, 5).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpertPlacement::FromAssignment({0, 1, 2}, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpertPlacement::FromAssignment({0, -1}, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpertPlacement::FromAssignment({}, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A device may host nothing (a drained shard).
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromAssignment({2, 0, 2, 0}, 3);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->experts_on(1).empty());
  EXPECT_EQ(std::vector<int32_t>(p->experts_on(2).begin(), p->experts_on(2).end()),
            (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(p->MinExpertsOn(2), 2);
  ModelConfig c = Config(TopkMethod::kGreedy, 5, 2, 1, 1);
  EXPECT_EQ(p->ValidateFor(c).code(), absl::StatusCode::kInvalidArgument);
  c.n_routed_experts = 4;
  EXPECT_TRUE(p->ValidateFor(c).ok());
}

TEST(DeviceLimitedTopKTest, RefusesBadInputByName) {
  ModelConfig c = Config(TopkMethod::kNoauxTc, 16, 4, 1, 1);
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(16, 4);
  ASSERT_TRUE(p.ok());
  std::vector<float> s(16, 0.5f), bias(16, 0.0f);
  EXPECT_TRUE(DeviceLimitedTopK(c, s, bias, *p, 1).ok());
  EXPECT_EQ(DeviceLimitedTopK(c, s, bias, *p, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceLimitedTopK(c, absl::MakeSpan(s).subspan(1), bias, *p, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceLimitedTopK(c, s, absl::MakeSpan(bias).subspan(1), *p, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  s[3] = std::numeric_limits<float>::quiet_NaN();
  absl::Status nan = DeviceLimitedTopK(c, s, bias, *p, 2).status();
  EXPECT_EQ(nan.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(nan.message().find("expert 3"), absl::string_view::npos) << nan;
  s[3] = 0.5f;
  // One device of 4 experts cannot supply 5.
  c.num_experts_per_tok = 5;
  EXPECT_EQ(DeviceLimitedTopK(c, s, bias, *p, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(DeviceLimitedTopK(c, s, bias, *p, 2).ok());
  // A placement for another model.
  absl::StatusOr<ExpertPlacement> other = ExpertPlacement::Contiguous(8, 4);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(DeviceLimitedTopK(c, s, bias, *other, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// When the limit cannot bind, the router selects exactly like the single-process engine: same
// experts in the same order, bit-identical weights.
TEST(DeviceLimitedTopKTest, UnboundLimitEqualsSelectExperts) {
  std::mt19937 rng(TestSeed("UnboundLimitEqualsSelectExperts"));
  std::vector<float> s, bias;
  for (const ModelConfig& c : Configs()) {
    SCOPED_TRACE(::testing::Message() << "method " << model::TopkMethodName(c.topk_method) << " n "
                                      << c.n_routed_experts);
    for (int trial = 0; trial < 300; ++trial) {
      const auto devices = static_cast<int32_t>(1 + rng() % 8);
      ExpertPlacement p = trial % 2 ? *ExpertPlacement::Contiguous(c.n_routed_experts, devices)
                                    : RandomPlacement(c.n_routed_experts, devices, 0, rng);
      RandomToken(c, rng, &s, &bias);
      const bool with_bias = trial % 3 != 0;
      const std::vector<float> no_bias;
      const std::vector<float>& b = with_bias ? bias : no_bias;
      ExpertChoice want = engine::SelectExperts(c, s, b);
      for (DeviceAffinity a : {DeviceAffinity::kMaxExpert, DeviceAffinity::kSumTopExperts}) {
        for (int32_t m : {devices, devices + 1, 1000}) {
          absl::StatusOr<ExpertChoice> got = DeviceLimitedTopK(c, s, b, p, m, a);
          ASSERT_TRUE(got.ok()) << got.status();
          ASSERT_EQ(got->experts, want.experts) << "trial " << trial << " M " << m;
          ASSERT_EQ(got->weights, want.weights) << "trial " << trial << " M " << m;
        }
      }
    }
  }
}

// Every token touches at most M devices, always gets k distinct experts, and the selection is
// what the definition says (checked against a plain reference).
TEST(DeviceLimitedTopKTest, RandomisedDeviceBoundAndReference) {
  std::mt19937 rng(TestSeed("RandomisedDeviceBoundAndReference"));
  std::vector<float> s, bias;
  for (const ModelConfig& c : Configs()) {
    SCOPED_TRACE(::testing::Message() << "method " << model::TopkMethodName(c.topk_method) << " n "
                                      << c.n_routed_experts);
    const int64_t k = c.num_experts_per_tok;
    for (int trial = 0; trial < 400; ++trial) {
      const auto devices = static_cast<int32_t>(2 + rng() % 7);
      const auto m = static_cast<int32_t>(1 + rng() % (devices - 1));  // binding: M < D
      // Every device must be able to supply k experts for M = 1, so give each at least k when
      // possible; otherwise raise M until any M devices suffice.
      const bool contiguous = trial % 2 == 0;
      ExpertPlacement p = contiguous ? *ExpertPlacement::Contiguous(c.n_routed_experts, devices)
                                     : RandomPlacement(c.n_routed_experts, devices, 1, rng);
      int32_t mm = m;
      while (p.MinExpertsOn(mm) < k) ++mm;
      RandomToken(c, rng, &s, &bias);
      for (DeviceAffinity a : {DeviceAffinity::kMaxExpert, DeviceAffinity::kSumTopExperts}) {
        absl::StatusOr<ExpertChoice> got = DeviceLimitedTopK(c, s, bias, p, mm, a);
        ASSERT_TRUE(got.ok()) << got.status();
        ASSERT_EQ(static_cast<int64_t>(got->experts.size()), k);
        ASSERT_EQ(std::set<int32_t>(got->experts.begin(), got->experts.end()).size(),
                  static_cast<size_t>(k));
        ASSERT_LE(DevicesTouched(got->experts, p), mm) << "trial " << trial;
        ASSERT_EQ(got->experts, ReferenceDeviceLimited(c, s, bias, p, mm, a))
            << "trial " << trial << " devices " << devices << " M " << mm;
        // Weights: the unbiased scores of the chosen experts, normalised as the model does.
        float sum = 0.0f;
        for (int32_t e : got->experts) sum += s[e];
        for (size_t i = 0; i < got->experts.size(); ++i) {
          const float w = c.norm_topk_prob ? s[got->experts[i]] / sum : s[got->experts[i]];
          ASSERT_NEAR(got->weights[i], w * static_cast<float>(c.routed_scaling_factor), 1e-5f);
        }
      }
    }
  }
}

// M = 1: every token's experts live on one device, the one holding its best kept expert.
TEST(DeviceLimitedTopKTest, SingleDevicePerToken) {
  std::mt19937 rng(TestSeed("SingleDevicePerToken"));
  std::vector<float> s, bias;
  ModelConfig c = Config(TopkMethod::kNoauxTc, 32, 4, 1, 1);
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(32, 4);
  ASSERT_TRUE(p.ok());
  for (int trial = 0; trial < 500; ++trial) {
    RandomToken(c, rng, &s, &bias);
    absl::StatusOr<ExpertChoice> got = DeviceLimitedTopK(c, s, bias, *p, 1);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(DevicesTouched(got->experts, *p), 1);
    // The model's top-1 (biased) expert is always kept, and its device chosen.
    ExpertChoice model_choice = engine::SelectExperts(c, s, bias);
    ASSERT_EQ(got->experts[0], model_choice.experts[0]);
    ASSERT_EQ(p->device_of(got->experts[1]), p->device_of(model_choice.experts[0]));
  }
}

TEST(DeviceLimitedTopKTest, AffinityRulesDiffer) {
  // 8 experts on 2 devices (0-3, 4-7), k = 2, M = 1. Device 0 has the single best expert;
  // device 1 the best pair.
  ModelConfig c = Config(TopkMethod::kGreedy, 8, 2, 1, 1);
  c.norm_topk_prob = true;
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(8, 2);
  ASSERT_TRUE(p.ok());
  std::vector<float> s = {0.30f, 0.02f, 0.02f, 0.02f, 0.25f, 0.25f, 0.07f, 0.07f};
  absl::StatusOr<ExpertChoice> by_max = DeviceLimitedTopK(c, s, {}, *p, 1);
  absl::StatusOr<ExpertChoice> by_sum =
      DeviceLimitedTopK(c, s, {}, *p, 1, DeviceAffinity::kSumTopExperts);
  ASSERT_TRUE(by_max.ok() && by_sum.ok());
  EXPECT_EQ(by_max->experts, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(by_sum->experts, (std::vector<int32_t>{4, 5}));
  EXPECT_FLOAT_EQ(by_max->weights[0], 0.30f / 0.32f);
  // Unbounded, the model would take experts 0 and 4 across both devices.
  absl::StatusOr<ExpertChoice> free = DeviceLimitedTopK(c, s, {}, *p, 2);
  ASSERT_TRUE(free.ok());
  EXPECT_EQ(free->experts, (std::vector<int32_t>{0, 4}));
}

// The group limit applies first: a device whose best expert is in a dropped group is not chosen
// for that expert.
TEST(DeviceLimitedTopKTest, GroupLimitComesFirst) {
  // 8 experts, 4 groups of 2 (noaux_tc: groups by top-2 sum, keep 1); devices: {0, 2, 4, 6}
  // and {1, 3, 5, 7}.
  ModelConfig c = Config(TopkMethod::kNoauxTc, 8, 2, 4, 1);
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromAssignment({0, 1, 0, 1, 0, 1, 0, 1}, 2);
  ASSERT_TRUE(p.ok());
  // Group 1 (experts 2, 3: sum 0.60) beats group 2 (experts 4, 5: sum 0.46), so expert 4, the
  // best single expert, is dropped by the model. Scored over all experts, device 0 would win
  // through expert 4; over the candidates (2 on device 0, 3 on device 1) device 1 wins.
  std::vector<float> s = {0.01f, 0.01f, 0.29f, 0.31f, 0.45f, 0.01f, 0.01f, 0.01f};
  absl::StatusOr<ExpertChoice> got = DeviceLimitedTopK(c, s, {}, *p, 1);
  ASSERT_TRUE(got.ok()) << got.status();
  // Device 1 holds candidate 3 (the best); it has no other candidate, so the fill comes from
  // its masked experts in the model's order (by index).
  EXPECT_EQ(got->experts, (std::vector<int32_t>{3, 1}));
  EXPECT_EQ(DevicesTouched(got->experts, *p), 1);
  // Two devices: exactly the model's choice.
  absl::StatusOr<ExpertChoice> both = DeviceLimitedTopK(c, s, {}, *p, 2);
  ASSERT_TRUE(both.ok());
  EXPECT_EQ(both->experts, engine::SelectExperts(c, s, {}).experts);
}

// ---------------------------------------------------------------------------------------------

TEST(ExpertLoadBalancerTest, RefusesModelsThatSelectWithoutBias) {
  EXPECT_EQ(ExpertLoadBalancer::Create(Config(TopkMethod::kGreedy, 8, 2, 1, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpertLoadBalancer::Create(Config(TopkMethod::kNoauxTc, 8, 2, 1, 1), {.gamma = 0.0f})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ExpertLoadBalancer::Create(Config(TopkMethod::kNoauxTc, 8, 2, 1, 1)).ok());
}

TEST(ExpertLoadBalancerTest, UpdateRuleIsSignOfDeviationFromTheMean) {
  absl::StatusOr<ExpertLoadBalancer> b =
      ExpertLoadBalancer::Create(Config(TopkMethod::kNoauxTc, 4, 2, 1, 1), {.gamma = 0.5f});
  ASSERT_TRUE(b.ok());
  b->Rebalance();  // empty window: nothing moves
  EXPECT_EQ(std::vector<float>(b->bias().begin(), b->bias().end()),
            (std::vector<float>{0, 0, 0, 0}));
  EXPECT_EQ(b->rebalances(), 0);
  // Loads 3, 2, 1, 2 (mean 2): expert 0 down, expert 2 up, experts 1 and 3 stay.
  ASSERT_TRUE(b->Record(std::vector<int32_t>{0, 1, 0, 2, 0, 3}).ok());
  ASSERT_TRUE(b->Record(std::vector<ExpertChoice>{{{1, 3}, {0.5f, 0.5f}}}).ok());
  EXPECT_EQ(b->window_assignments(), 8);
  EXPECT_EQ(b->Record(std::vector<int32_t>{1, 4}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b->window_assignments(), 8);  // nothing of the bad batch counted
  EXPECT_EQ(b->window_load()[1], 2);
  b->Rebalance();
  EXPECT_EQ(std::vector<float>(b->bias().begin(), b->bias().end()),
            (std::vector<float>{-0.5f, 0.0f, 0.5f, 0.0f}));
  EXPECT_EQ(b->window_assignments(), 0);
  // The selection bias adds the checkpoint's.
  absl::StatusOr<std::vector<float>> sel = b->SelectionBias(std::vector<float>{1, 1, 1, 1});
  ASSERT_TRUE(sel.ok());
  EXPECT_EQ(*sel, (std::vector<float>{0.5f, 1.0f, 1.5f, 1.0f}));
  EXPECT_EQ(b->SelectionBias(std::vector<float>{1}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// max load / mean load over a window of per-expert counts.
double Imbalance(const std::vector<int64_t>& load) {
  int64_t total = 0, most = 0;
  for (int64_t l : load) {
    total += l;
    most = std::max(most, l);
  }
  return static_cast<double>(most) * static_cast<double>(load.size()) / static_cast<double>(total);
}

// A skewed synthetic stream (some experts are systematically preferred by the gate) becomes
// balanced as the bias adapts, with device-limited routing in the loop.
TEST(ExpertLoadBalancerTest, SkewedLoadConvergesTowardBalance) {
  std::mt19937 rng(TestSeed("SkewedLoadConvergesTowardBalance"));
  std::normal_distribution<float> g(0.0f, 1.0f);
  ModelConfig c = Config(TopkMethod::kNoauxTc, 32, 4, 4, 2);
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(32, 8);
  absl::StatusOr<ExpertLoadBalancer> b = ExpertLoadBalancer::Create(c, {.gamma = 0.01f});
  ASSERT_TRUE(p.ok() && b.ok());
  std::vector<float> skew(32);
  for (int e = 0; e < 32; ++e)
    skew[e] = 1.5f * std::sin(0.7f * static_cast<float>(e)) + (e < 4 ? 1.0f : 0.0f);
  const std::vector<float> checkpoint_bias(32, 0.0f);
  std::vector<float> s(32);
  // The first batch (no bias yet) against the last 50 batches together (less sampling noise).
  double first = 0;
  std::vector<int64_t> tail(32, 0);
  const int batches = 400, tokens = 256;
  for (int batch = 0; batch < batches; ++batch) {
    absl::StatusOr<std::vector<float>> bias = b->SelectionBias(checkpoint_bias);
    ASSERT_TRUE(bias.ok());
    std::vector<ExpertChoice> choices;
    for (int t = 0; t < tokens; ++t) {
      for (int e = 0; e < 32; ++e) s[e] = 1.0f / (1.0f + std::exp(-(skew[e] + g(rng))));
      absl::StatusOr<ExpertChoice> choice = DeviceLimitedTopK(c, s, *bias, *p, 2);
      ASSERT_TRUE(choice.ok()) << choice.status();
      choices.push_back(*std::move(choice));
    }
    ASSERT_TRUE(b->Record(choices).ok());
    const std::vector<int64_t> load(b->window_load().begin(), b->window_load().end());
    if (batch == 0) first = Imbalance(load);
    if (batch >= batches - 50) {
      for (int e = 0; e < 32; ++e) tail[e] += load[e];
    }
    b->Rebalance();
  }
  const double last = Imbalance(tail);
  std::printf("imbalance (max/mean load): first batch %.3f, last 50 batches %.3f\n", first, last);
  EXPECT_GT(first, 2.0);  // the stream really is skewed
  EXPECT_LT(last, 1.25);
}

// The bias moves the selection, never the weights: whatever the bias, each chosen expert's
// weight comes from the unbiased scores, and a token whose choice the bias does not change gets
// bit-identical weights.
TEST(ExpertLoadBalancerTest, GateWeightsNeverDependOnTheBias) {
  std::mt19937 rng(TestSeed("GateWeightsNeverDependOnTheBias"));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  ModelConfig c = Config(TopkMethod::kNoauxTc, 32, 8, 8, 4);
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(32, 4);
  ASSERT_TRUE(p.ok());
  std::vector<float> s, checkpoint_bias;
  int unchanged = 0;
  for (int trial = 0; trial < 500; ++trial) {
    RandomToken(c, rng, &s, &checkpoint_bias);
    std::vector<float> balance(32);
    const float scale = trial % 2 ? 1e-4f : 0.3f;  // small: selection mostly unchanged
    for (float& x : balance) x = u(rng) * scale;
    std::vector<float> with(checkpoint_bias);
    for (int e = 0; e < 32; ++e) with[e] += balance[e];
    for (int32_t m : {2, 4}) {
      absl::StatusOr<ExpertChoice> base = DeviceLimitedTopK(c, s, checkpoint_bias, *p, m);
      absl::StatusOr<ExpertChoice> biased = DeviceLimitedTopK(c, s, with, *p, m);
      ASSERT_TRUE(base.ok() && biased.ok());
      float sum = 0.0f;
      for (int32_t e : biased->experts) sum += s[e];
      for (size_t i = 0; i < biased->experts.size(); ++i) {
        ASSERT_FLOAT_EQ(biased->weights[i], s[biased->experts[i]] / sum * 2.5f);
      }
      if (base->experts == biased->experts) {
        ++unchanged;
        ASSERT_EQ(base->weights, biased->weights);
      }
    }
  }
  EXPECT_GT(unchanged, 100);
}

}  // namespace
}  // namespace splitmoe::routing
