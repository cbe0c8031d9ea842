// An expert shard on a CUDA device (`expert --device cuda:N`) against the same shard on the CPU,
// on a generated tiny model: ragged batches (tokens with 0..top_k of their experts here), main
// layers and the MTP block, 1 to 300 tokens. fp32 mode within 1e-4 of the CPU (only the
// summation order differs); bf16 mode's error printed and bounded loosely (BF16 activations
// into the GEMMs). Skipped (not passed) without a CUDA device: scripts/gpu-check.sh owes it.
#include "expert_service/cuda/gpu_experts.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <thread>

#include "common/engine/engine.h"
#include "common/engine/routing.h"
#include "common/kernels/cuda/cuda_ops.h"
#include "expert_service/expert_shard.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::expert_service {
namespace {

class GpuExpertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> n = kernels::cuda::DeviceCount();
    if (!n.ok() || *n == 0) {
      GTEST_SKIP() << "no CUDA device on this machine: GPU check owed, run scripts/gpu-check.sh";
    }
    EnableCudaExperts();
  }
};

struct Batch {
  int64_t layer = 0;
  int64_t tokens = 0;
  std::vector<float> x;
  std::vector<int32_t> offsets, ids;
  std::vector<float> weights;
};

// Tokens routed by the model's own gate, keeping the selections that fall on `shard`.
Batch MakeBatch(const engine::Engine& engine, const ExpertShard& shard, int64_t layer,
                int64_t tokens, std::mt19937& rng) {
  const model::ModelConfig& c = engine.config();
  const int64_t h = c.hidden_size, n = c.n_routed_experts;
  Batch b;
  b.layer = layer;
  b.tokens = tokens;
  std::normal_distribution<float> normal;
  b.x.resize(static_cast<size_t>(tokens * h));
  for (float& v : b.x) v = normal(rng);
  const auto& gate_layer = layer < c.num_hidden_layers ? engine.weights().layers[layer]
                                                       : engine.weights().mtp[0].block;
  std::vector<float> scores(static_cast<size_t>(tokens * n));
  engine::GateScores(c, b.x.data(), tokens, gate_layer.gate, scores.data());
  b.offsets = {0};
  const auto& mine = shard.experts();
  for (int64_t t = 0; t < tokens; ++t) {
    engine::ExpertChoice choice = engine::SelectExperts(
        c, absl::MakeConstSpan(scores.data() + t * n, n), gate_layer.gate_bias);
    for (size_t i = 0; i < choice.experts.size(); ++i) {
      if (std::find(mine.begin(), mine.end(), choice.experts[i]) == mine.end()) continue;
      b.ids.push_back(choice.experts[i]);
      b.weights.push_back(choice.weights[i]);
    }
    b.offsets.push_back(static_cast<int32_t>(b.ids.size()));
  }
  return b;
}

std::vector<float> Run(const ExpertShard& shard, const Batch& b) {
  std::vector<float> out(b.x.size(), -1.0f);
  absl::Status s = shard.Compute(b.layer, b.x, b.tokens, b.offsets, b.ids, b.weights,
                                 absl::MakeSpan(out));
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

// ||got - want|| / ||want||, and the worst element against 1 + |want|.
std::pair<double, double> Errors(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0, worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
    worst = std::max(worst, std::fabs(d) / (1.0 + std::fabs(want[i])));
  }
  return {den > 0 ? std::sqrt(num / den) : std::sqrt(num), worst};
}

void CompareModes(bool bf16) {
  const std::string dir = testing::TinyModel("gpu_experts", nullptr);
  auto engine = engine::Engine::Load(dir);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const model::ModelConfig& c = (*engine)->config();
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (int s = 0; s < 2; ++s) {
    auto cpu = ExpertShard::Load(dir, {.shard = s, .num_shards = 2});
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    ShardSpec spec{.shard = s, .num_shards = 2};
    spec.device.backend = kernels::Backend::kCuda;
    spec.device_bf16 = bf16;
    auto gpu = ExpertShard::Load(dir, spec);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ((*gpu)->device(), bf16 ? "cuda:0 bf16" : "cuda:0 fp32");
    // The device holds the values (fp32: twice the BF16 checkpoint's bytes), the host none.
    const double want_bytes = static_cast<double>((*cpu)->resident_bytes()) * (bf16 ? 1.0 : 2.0);
    EXPECT_NEAR(static_cast<double>((*gpu)->resident_bytes()), want_bytes, 0.05 * want_bytes);
    for (int64_t layer : {int64_t{1}, int64_t{2}, c.num_hidden_layers /* MTP block */}) {
      for (int64_t tokens : {1, 5, 64, 300}) {
        const Batch b = MakeBatch(**engine, **cpu, layer, tokens, rng);
        const std::vector<float> want = Run(**cpu, b);
        const std::vector<float> got = Run(**gpu, b);
        const auto [norm, worst] = Errors(got, want);
        std::printf("%s shard %d layer %lld tokens %lld (%zu selections): error %.3g in norm, "
                    "worst %.3g\n",
                    bf16 ? "bf16" : "fp32", s, static_cast<long long>(layer),
                    static_cast<long long>(tokens), b.ids.size(), norm, worst);
        if (bf16) {
          EXPECT_LT(norm, 2e-2) << "layer " << layer << " tokens " << tokens;
        } else {
          EXPECT_LT(worst, 1e-4) << "layer " << layer << " tokens " << tokens;
        }
      }
    }
    // Two threads at once: each batch's answer is its own.
    const Batch a = MakeBatch(**engine, **cpu, 1, 40, rng), b = MakeBatch(**engine, **cpu, 2, 70, rng);
    const std::vector<float> want_a = Run(**gpu, a), want_b = Run(**gpu, b);
    std::vector<float> got_a, got_b;
    std::thread t1([&] { for (int i = 0; i < 20; ++i) got_a = Run(**gpu, a); });
    std::thread t2([&] { for (int i = 0; i < 20; ++i) got_b = Run(**gpu, b); });
    t1.join();
    t2.join();
    EXPECT_EQ(got_a, want_a);
    EXPECT_EQ(got_b, want_b);
    // The shard's checks stand before the device for both: an expert held elsewhere, a dense
    // layer (with an expert held here).
    std::vector<float> x(static_cast<size_t>(c.hidden_size), 1.0f), out(x.size());
    std::vector<int32_t> offsets = {0, 1}, ids = {s == 0 ? static_cast<int32_t>(c.n_routed_experts - 1) : 0};
    std::vector<float> w = {1.0f};
    absl::Status refused = (*gpu)->Compute(1, x, 1, offsets, ids, w, absl::MakeSpan(out));
    EXPECT_NE(refused.message().find("is not hosted"), std::string::npos) << refused;
    ids = {(*cpu)->experts().front()};
    refused = (*gpu)->Compute(0, x, 1, offsets, ids, w, absl::MakeSpan(out));
    EXPECT_NE(refused.message().find("not a MoE layer"), std::string::npos) << refused;
  }
}

TEST_F(GpuExpertsTest, Fp32ModeEqualsTheCpuShard) { CompareModes(/*bf16=*/false); }

TEST_F(GpuExpertsTest, Bf16ModeStaysNearTheCpuShard) { CompareModes(/*bf16=*/true); }

// Runs on every machine: with no device at all (CI's) or with fewer than 4097.
TEST(GpuExpertsLoadTest, ADeviceThatDoesNotExistIsRefused) {
  EnableCudaExperts();
  const std::string dir = testing::TinyModel("gpu_experts", nullptr);
  ShardSpec spec;
  spec.device.backend = kernels::Backend::kCuda;
  spec.device.index = 4096;
  auto shard = ExpertShard::Load(dir, spec);
  ASSERT_FALSE(shard.ok());
  EXPECT_EQ(shard.status().code(), absl::StatusCode::kFailedPrecondition) << shard.status();
}

}  // namespace
}  // namespace splitmoe::expert_service
