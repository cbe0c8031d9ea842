// The capacity model against what is known without it: DeepSeek-V3's published parameter counts
// (671B in total, 37B activated per token) from its config alone, the directions every stage
// must move in, the hardware file's checks, and the split search's promises.
#include "common/plan/capacity.h"

#include "common/model/config.h"
#include "gtest/gtest.h"

namespace splitmoe::plan {
namespace {

constexpr char kV3Config[] = R"({
  "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
  "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
  "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
  "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
  "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
  "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
  "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
  "rope_theta": 10000, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                   "type": "yarn"}})";

model::ModelConfig V3() {
  auto c = model::ParseModelConfig(kV3Config, "v3");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

Hardware H200() {
  auto hw = ParseHardware(R"({"gemm_flops": 1.979e15, "gemm_efficiency": 0.5, "mem_bw": 4.8e12,
      "mem_efficiency": 0.8, "mem_bytes": 141e9, "net_bw": 50e9, "net_latency_s": 5e-6,
      "message_overhead_s": 5e-6, "weight_bytes": 1, "kv_bytes": 2, "wire_bytes": 1.5})",
                          "h200");
  EXPECT_TRUE(hw.ok()) << hw.status();
  return *hw;
}

TEST(CapacityTest, DeepSeekV3sParameterCountsFromItsConfig) {
  const ModelCosts m = Costs(V3());
  EXPECT_EQ(m.moe_layers, 58);
  EXPECT_EQ(m.dense_layers, 3);
  const double embed = 129280.0 * 7168;
  const double total = m.attention_params + embed + 256.0 * 58 * m.expert_params;
  const double active = m.attention_params + 8.0 * 58 * m.expert_params;
  EXPECT_NEAR(total / 1e9, 671, 671 * 0.02) << "published: 671B (MTP module excluded)";
  EXPECT_NEAR(active / 1e9, 37, 37 * 0.05) << "published: 37B activated per token";
  EXPECT_EQ(m.latent_values_per_token, 61.0 * 576);
}

TEST(CapacityTest, StagesMoveTheWayTheyMust) {
  const model::ModelConfig c = V3();
  const Hardware hw = H200();
  Deployment d;
  d.prefill = 4;
  d.decode = 4;
  d.expert_pools = 8;
  d.replicas = 1;
  d.prompt_tokens = 2048;
  d.output_tokens = 512;
  double last_tpot = 0, last_rate = 0;
  for (int64_t b : {1, 8, 64, 256}) {
    d.decode_batch = b;
    const Prediction p = Predict(c, hw, d);
    EXPECT_GT(p.tpot_s, last_tpot) << "a bigger batch never steps faster";
    EXPECT_GE(p.decode_tokens_per_s, last_rate * 0.999) << "nor serves fewer tokens";
    last_tpot = p.tpot_s;
    last_rate = p.decode_tokens_per_s;
  }
  d.decode_batch = 64;
  const Prediction one = Predict(c, hw, d);
  d.micro_batches = 2;
  const Prediction two = Predict(c, hw, d);
  EXPECT_LT(two.tpot_s, one.tpot_s) << "ping-pong hides one side behind the other";
  d.micro_batches = 1;
  Hardware slow = hw;
  slow.net_bw /= 10;
  EXPECT_GT(Predict(c, slow, d).network_s, one.network_s * 5);
  d.prompt_tokens = 8192;
  EXPECT_GT(Predict(c, hw, d).ttft_s, one.ttft_s * 3) << "prefill grows at least linearly";
  // A batch whose latents cannot fit a device is marked.
  d.decode_batch = 4096;
  EXPECT_FALSE(Predict(c, hw, d).fits);
}

TEST(CapacityTest, TheSplitSearchKeepsItsPromises) {
  const model::ModelConfig c = V3();
  Deployment shape;
  shape.prompt_tokens = 1024;
  shape.output_tokens = 1024;
  shape.micro_batches = 2;
  const auto best = BestSplits(c, H200(), 32, 0.05, shape, 5);
  ASSERT_FALSE(best.empty());
  for (size_t i = 0; i < best.size(); ++i) {
    EXPECT_LE(best[i].second.tpot_s, 0.05);
    EXPECT_TRUE(best[i].second.fits);
    EXPECT_EQ(best[i].first.devices(), 32);
    if (i > 0) {
      EXPECT_LE(best[i].second.tokens_per_s_per_device,
                best[i - 1].second.tokens_per_s_per_device);
    }
  }
  EXPECT_TRUE(BestSplits(c, H200(), 32, 1e-6, shape, 5).empty()) << "nothing steps in 1 us";
}

TEST(CapacityTest, HardwareFilesAreChecked) {
  EXPECT_EQ(ParseHardware("[]", "x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseHardware(R"({"gemm_flops": 1, "mem_bw": 1})", "x").status().code(),
            absl::StatusCode::kInvalidArgument);  // no net_bw
  EXPECT_EQ(ParseHardware(R"({"gemm_flops": 1, "mem_bw": -1, "net_bw": 1})", "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseHardware(R"({"gemm_flops": 1, "mem_bw": 1, "net_bw": 1, "colocated": 3})", "x")
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  auto ok = ParseHardware(R"({"gemm_flops": 1, "mem_bw": 1, "net_bw": 1, "colocated": true})", "x");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->colocated);
}

}  // namespace
}  // namespace splitmoe::plan
