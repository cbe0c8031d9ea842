// Expert shards against the single-process engine: the routed output of a MoE layer equals the
// sum of the shards' partial outputs, each shard holds only its experts, and bad batches are
// refused with a clear error.
#include "expert_service/expert_shard.h"

#include <cmath>
#include <random>

#include "common/engine/engine.h"
#include "common/engine/routing.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::expert_service {
namespace {

TEST(ExpertShardTest, ShardsSumToTheEnginesRoutedOutput) {
  std::string dir = testing::TinyModel("shards", nullptr);
  auto engine = engine::Engine::Load(dir);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const auto& c = (*engine)->config();
  std::vector<std::unique_ptr<ExpertShard>> shards;
  for (int s = 0; s < 3; ++s) {
    auto shard = ExpertShard::Load(dir, {.shard = s, .num_shards = 3});
    ASSERT_TRUE(shard.ok()) << shard.status();
    shards.push_back(std::move(*shard));
  }
  EXPECT_EQ(shards[0]->experts().size() + shards[1]->experts().size() + shards[2]->experts().size(),
            static_cast<size_t>(c.n_routed_experts));
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const int64_t tokens = 23, h = c.hidden_size, n = c.n_routed_experts;
  for (int64_t layer : {int64_t{1}, int64_t{2}, c.num_hidden_layers /* MTP block */}) {
    std::vector<float> x(tokens * h), scores(tokens * n);
    for (float& v : x) v = normal(rng);
    const auto& gate_layer = layer < c.num_hidden_layers ? (*engine)->weights().layers[layer]
                                                         : (*engine)->weights().mtp[0].block;
    engine::GateScores(c, x.data(), tokens, gate_layer.gate, scores.data());
    engine::LocalMoeExecutor local(c, (*engine)->weights());
    std::vector<float> want(tokens * h);
    ASSERT_TRUE(local.RoutedExperts(layer, x.data(), scores.data(), tokens, want.data()).ok());

    std::vector<float> got(tokens * h, 0.0f);
    for (const auto& shard : shards) {
      std::vector<int32_t> offsets = {0}, ids;
      std::vector<float> weights;
      for (int64_t t = 0; t < tokens; ++t) {
        engine::ExpertChoice choice = engine::SelectExperts(
            c, absl::MakeConstSpan(scores.data() + t * n, n), gate_layer.gate_bias);
        for (size_t i = 0; i < choice.experts.size(); ++i) {
          const auto& mine = shard->experts();
          if (std::find(mine.begin(), mine.end(), choice.experts[i]) == mine.end()) continue;
          ids.push_back(choice.experts[i]);
          weights.push_back(choice.weights[i]);
        }
        offsets.push_back(static_cast<int32_t>(ids.size()));
      }
      std::vector<float> part(tokens * h);
      absl::Status s =
          shard->Compute(layer, x, tokens, offsets, ids, weights, absl::MakeSpan(part));
      ASSERT_TRUE(s.ok()) << s;
      for (int64_t i = 0; i < tokens * h; ++i) got[i] += part[i];
    }
    for (int64_t i = 0; i < tokens * h; ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-4f * (1.0f + std::fabs(want[i])))
          << "layer " << layer << " at " << i;
    }
  }
}

TEST(ExpertShardTest, HoldsOnlyItsExpertsAndRefusesOthers) {
  std::string dir = testing::TinyModel("shards", nullptr);
  auto shard = ExpertShard::Load(dir, {.shard = 1, .num_shards = 2});
  ASSERT_TRUE(shard.ok());
  const auto& c = (*shard)->config();
  EXPECT_EQ((*shard)->experts().front(), c.n_routed_experts / 2);
  // Experts of 2 MoE layers + 1 MTP block, half of them, 3 matrices of moe_inter x hidden each,
  // held as the checkpoint stores them: BF16, 2 bytes a value.
  const uint64_t expected =
      3ull * (c.n_routed_experts / 2) * 3 * c.moe_intermediate_size * c.hidden_size * 2;
  EXPECT_NEAR(static_cast<double>((*shard)->resident_bytes()), static_cast<double>(expected),
              expected * 0.05);
  // Widened at load (--weights fp32), twice that.
  auto fp32 = ExpertShard::Load(
      dir, {.shard = 1, .num_shards = 2, .weights = model::ResidentDType::kFloat32});
  ASSERT_TRUE(fp32.ok());
  EXPECT_NEAR(static_cast<double>((*fp32)->resident_bytes()), 2.0 * expected, expected * 0.1);
  std::vector<float> x(c.hidden_size, 1.0f), out(c.hidden_size);
  std::vector<int32_t> offsets = {0, 1}, ids = {0};
  std::vector<float> weights = {1.0f};
  absl::Status s = (*shard)->Compute(1, x, 1, offsets, ids, weights, absl::MakeSpan(out));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("expert 0 is not hosted"), std::string::npos) << s;
  s = (*shard)->Compute(0, x, 1, offsets, ids, weights, absl::MakeSpan(out));
  EXPECT_NE(s.message().find("not a MoE layer"), std::string::npos) << s;
  offsets = {0, 2};
  s = (*shard)->Compute(1, x, 1, offsets, ids, weights, absl::MakeSpan(out));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_FALSE(ExpertShard::Load(dir, {.shard = 2, .num_shards = 2}).ok());
  const int32_t held = (*shard)->experts().front();
  // An offset past the ids, even one a later offset "corrects" (it would be read first).
  ids = {held, held};
  offsets = {0, 100, 2};
  std::vector<float> x2(2 * c.hidden_size, 1.0f), out2(x2.size());
  weights = {1.0f, 1.0f};
  s = (*shard)->Compute(1, x2, 2, offsets, ids, weights, absl::MakeSpan(out2));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("offsets[1] = 100"), std::string::npos) << s;
  offsets = {0, 2};
  // A token selecting one expert twice (the GPU's slot reduction would count it once).
  ids = {held, held};
  weights = {0.5f, 0.5f};
  s = (*shard)->Compute(1, x, 1, offsets, ids, weights, absl::MakeSpan(out));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("twice"), std::string::npos) << s;
}

TEST(ExpertShardTest, ACudaDeviceWithoutTheCudaBackendIsRefusedByName) {
  // This test binary does not link expert_service_cuda: no loader is installed.
  std::string dir = testing::TinyModel("shards", nullptr);
  ShardSpec spec;
  spec.device.backend = kernels::Backend::kCuda;
  spec.device.index = 0;
  auto shard = ExpertShard::Load(dir, spec);
  ASSERT_FALSE(shard.ok());
  EXPECT_EQ(shard.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(shard.status().message().find("cuda:0"), std::string::npos) << shard.status();
  EXPECT_NE(shard.status().message().find("no CUDA backend"), std::string::npos) << shard.status();
  EXPECT_EQ(ShardDeviceName(spec), "cuda:0 fp32");
  spec.device_bf16 = true;
  EXPECT_EQ(ShardDeviceName(spec), "cuda:0 bf16");
  auto cpu = ExpertShard::Load(dir, {.shard = 0, .num_shards = 2});
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->device(), "cpu");
}

}  // namespace
}  // namespace splitmoe::expert_service
