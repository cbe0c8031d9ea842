#include "common/model/config.h"

#include <cmath>
#include <string>

#include "gtest/gtest.h"

namespace splitmoe::model {
namespace {

// DeepSeek-V3's published config.json (the fields that matter).
constexpr char kV3Config[] = R"({
  "architectures": ["DeepseekV3ForCausalLM"], "bos_token_id": 0, "eos_token_id": 1,
  "first_k_dense_replace": 3, "hidden_size": 7168, "intermediate_size": 18432,
  "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
  "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128,
  "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
  "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [128, 128]}})";

// DeepSeek-V2-Lite's: q_lora_rank null, softmax, greedy, a single group.
constexpr char kV2LiteConfig[] = R"({
  "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
  "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
  "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
  "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false,
  "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
  "q_lora_rank": null, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                   "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
  "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
  "vocab_size": 102400})";

TEST(ModelConfigTest, ParsesDeepSeekV3) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kV3Config, "v3/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->latent_dim(), 576);
  EXPECT_EQ(c->topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSigmoid);
  EXPECT_TRUE(c->HasScoreBias());
  EXPECT_TRUE(c->UsesGroups());
  EXPECT_TRUE(c->yarn.enabled);
  EXPECT_FALSE(c->IsMoeLayer(2));
  EXPECT_TRUE(c->IsMoeLayer(3));
  // (192)^-0.5 * (0.1 * ln 40 + 1)^2
  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c->SoftmaxScale(), m * m / std::sqrt(192.0), 1e-12);
}

TEST(ModelConfigTest, ParsesDeepSeekV2LiteWithNullQLora) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kV2LiteConfig, "v2/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_lora_rank, 0);
  EXPECT_FALSE(c->UsesGroups());
  EXPECT_FALSE(c->HasScoreBias());
  const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c->SoftmaxScale(), m * m / std::sqrt(192.0), 1e-12);
}

TEST(ModelConfigTest, RoundTripsThroughJson) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kV3Config, "v3");
  ASSERT_TRUE(c.ok());
  absl::StatusOr<ModelConfig> again = ParseModelConfig(ModelConfigToJson(*c), "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->kv_lora_rank, c->kv_lora_rank);
  EXPECT_EQ(again->topk_group, c->topk_group);
  EXPECT_EQ(again->yarn.factor, c->yarn.factor);
  EXPECT_EQ(again->SoftmaxScale(), c->SoftmaxScale());
}

std::string Replace(std::string text, const std::string& from, const std::string& to) {
  size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return text.replace(at, from.size(), to);
}

TEST(ModelConfigTest, RefusesContradictions) {
  struct Case {
    std::string from, to, expect;
  } cases[] = {
      {R"("n_group": 8)", R"("n_group": 7)", "multiple of n_group"},
      {R"("topk_group": 4)", R"("topk_group": 9)", "topk_group"},
      {R"("num_experts_per_tok": 8)", R"("num_experts_per_tok": 300)", "num_experts_per_tok"},
      {R"("topk_method": "noaux_tc")", R"("topk_method": "best")", "unknown topk_method"},
      {R"("scoring_func": "sigmoid")", R"("scoring_func": "relu")", "unknown scoring_func"},
      {R"("qk_rope_head_dim": 64)", R"("qk_rope_head_dim": 63)", "even"},
      {R"("hidden_size": 7168)", R"("hidden_size": "big")", "hidden_size"},
      {R"("kv_lora_rank": 512,)", "", "kv_lora_rank"},
      {R"("eos_token_id": 1)", R"("eos_token_id": 200000)", "vocab_size"},
      {R"("type": "yarn")", R"("type": "ntk")", "rope_scaling"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ModelConfig> r =
        ParseModelConfig(Replace(kV3Config, c.from, c.to), "bad/config.json");
    ASSERT_FALSE(r.ok()) << c.to;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.expect), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find("bad/config.json"), std::string::npos) << r.status();
  }
}

TEST(ModelConfigTest, RefusesNonJson) {
  EXPECT_FALSE(ParseModelConfig("{not json", "x").ok());
  EXPECT_FALSE(ParseModelConfig("[1, 2]", "x").ok());
  EXPECT_FALSE(ParseModelConfig("", "x").ok());
}

}  // namespace
}  // namespace splitmoe::model
