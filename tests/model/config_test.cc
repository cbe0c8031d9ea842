#include "common/model/config.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

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

// Every size-like field has an upper bound, checked before anything is sized by it; the error
// names the file, the field, the value and the limit.
TEST(ModelConfigTest, RefusesAbsurdSizesNamingTheField) {
  struct Case {
    std::string from, to, expect;
  } cases[] = {
      {R"("n_routed_experts": 256)", R"("n_routed_experts": 4194304)",
       "n_routed_experts = 4194304 exceeds the limit 65536"},
      {R"("num_hidden_layers": 61)", R"("num_hidden_layers": 2147483648)",
       "num_hidden_layers = 2147483648 exceeds the limit 1024"},
      {R"("vocab_size": 129280)", R"("vocab_size": 1000000000000)",
       "vocab_size = 1000000000000 exceeds the limit"},
      {R"("hidden_size": 7168)", R"("hidden_size": 1048576)", "hidden_size = 1048576 exceeds"},
      {R"("intermediate_size": 18432)", R"("intermediate_size": 4294967296)",
       "intermediate_size = 4294967296 exceeds"},
      {R"("moe_intermediate_size": 2048)", R"("moe_intermediate_size": 1e9)",
       "moe_intermediate_size = 1000000000 exceeds"},
      {R"("num_attention_heads": 128)", R"("num_attention_heads": 100000)",
       "num_attention_heads = 100000 exceeds"},
      {R"("q_lora_rank": 1536)", R"("q_lora_rank": 10000000)", "q_lora_rank = 10000000 exceeds"},
      {R"("kv_lora_rank": 512)", R"("kv_lora_rank": 10000000)", "kv_lora_rank = 10000000 exceeds"},
      {R"("qk_nope_head_dim": 128)", R"("qk_nope_head_dim": 65536)", "qk_nope_head_dim = 65536"},
      {R"("qk_rope_head_dim": 64)", R"("qk_rope_head_dim": 65536)", "qk_rope_head_dim = 65536"},
      {R"("v_head_dim": 128)", R"("v_head_dim": 65536)", "v_head_dim = 65536 exceeds"},
      {R"("n_shared_experts": 1)", R"("n_shared_experts": 100000)", "n_shared_experts = 100000"},
      {R"("num_experts_per_tok": 8)", R"("num_experts_per_tok": 100000)",
       "num_experts_per_tok = 100000 exceeds"},
      {R"("n_group": 8)", R"("n_group": 1048576)", "n_group = 1048576 exceeds"},
      {R"("topk_group": 4)", R"("topk_group": 1048576)", "topk_group = 1048576 exceeds"},
      {R"("first_k_dense_replace": 3)", R"("first_k_dense_replace": 100000)",
       "first_k_dense_replace = 100000 exceeds"},
      {R"("moe_layer_freq": 1)", R"("moe_layer_freq": 100000)", "moe_layer_freq = 100000"},
      {R"("max_position_embeddings": 163840)", R"("max_position_embeddings": 4294967296)",
       "max_position_embeddings = 4294967296 exceeds the limit 16777216"},
      {R"("num_nextn_predict_layers": 1)", R"("num_nextn_predict_layers": 1000)",
       "num_nextn_predict_layers = 1000 exceeds"},
      {R"("original_max_position_embeddings": 4096)",
       R"("original_max_position_embeddings": 4294967296)",
       "rope_scaling.original_max_position_embeddings = 4294967296 exceeds"},
      // Outside int64: refused, never wrapped into a plausible value.
      {R"("n_routed_experts": 256)", R"("n_routed_experts": 18446744073709551615)",
       "'n_routed_experts' = 18446744073709551615 is out of range"},
      {R"("num_hidden_layers": 61)", R"("num_hidden_layers": 1e300)",
       "'num_hidden_layers' = 1e+300 is out of range"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ModelConfig> r =
        ParseModelConfig(Replace(kV3Config, c.from, c.to), "big/config.json");
    ASSERT_FALSE(r.ok()) << c.to;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(r.status().message().find("big/config.json: "), 0u) << r.status();
    EXPECT_NE(r.status().message().find(c.expect), std::string::npos) << r.status();
  }
}

TEST(ModelConfigTest, RefusesNegativeAndZeroSizesNamingTheField) {
  struct Case {
    std::string from, to, expect;
  } cases[] = {
      {R"("n_routed_experts": 256)", R"("n_routed_experts": -1)",
       "n_routed_experts must be >= 0, got -1"},
      {R"("n_shared_experts": 1)", R"("n_shared_experts": -2)", "n_shared_experts must be >= 0"},
      {R"("q_lora_rank": 1536)", R"("q_lora_rank": -1)", "q_lora_rank must be >= 0"},
      {R"("qk_nope_head_dim": 128)", R"("qk_nope_head_dim": -128)", "qk_nope_head_dim must be"},
      {R"("first_k_dense_replace": 3)", R"("first_k_dense_replace": -3)",
       "first_k_dense_replace must be >= 0"},
      {R"("num_nextn_predict_layers": 1)", R"("num_nextn_predict_layers": -1)",
       "num_nextn_predict_layers must be >= 0"},
      {R"("num_hidden_layers": 61)", R"("num_hidden_layers": 0)", "num_hidden_layers must be > 0"},
      {R"("vocab_size": 129280)", R"("vocab_size": -5)", "vocab_size must be > 0"},
      {R"("hidden_size": 7168)", R"("hidden_size": -9223372036854775808)", "hidden_size must be"},
      {R"("num_attention_heads": 128)", R"("num_attention_heads": 0)", "num_attention_heads"},
      {R"("kv_lora_rank": 512)", R"("kv_lora_rank": 0)", "kv_lora_rank must be > 0"},
      {R"("v_head_dim": 128)", R"("v_head_dim": 0)", "v_head_dim must be > 0"},
      {R"("max_position_embeddings": 163840)", R"("max_position_embeddings": 0)",
       "max_position_embeddings must be > 0"},
      {R"("moe_layer_freq": 1)", R"("moe_layer_freq": 0)", "moe_layer_freq must be > 0"},
      {R"("moe_intermediate_size": 2048)", R"("moe_intermediate_size": 0)",
       "moe_intermediate_size must be > 0"},
      {R"("n_group": 8)", R"("n_group": -8)", "n_group must be >= 0"},
      {R"("bos_token_id": 0)", R"("bos_token_id": -7)", "bos_token_id must be >= -1"},
      {R"("rope_theta": 10000)", R"("rope_theta": 0)", "rope_theta must be > 1"},
      {R"("rms_norm_eps": 1e-06)", R"("rms_norm_eps": -1)", "rms_norm_eps must be > 0"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ModelConfig> r =
        ParseModelConfig(Replace(kV3Config, c.from, c.to), "neg/config.json");
    ASSERT_FALSE(r.ok()) << c.to;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.expect), std::string::npos) << r.status();
  }
}

// Fields each within bounds can still imply an absurd model together: the expert instances a
// full load would hold, the largest tensor and the parameter count are bounded too.
TEST(ModelConfigTest, RefusesAbsurdDerivedSizes) {
  // 1024 layers x 65536 experts: every field is within its bound.
  std::string many_experts =
      Replace(kV3Config, R"("num_hidden_layers": 61)", R"("num_hidden_layers": 1024)");
  many_experts =
      Replace(many_experts, R"("n_routed_experts": 256)", R"("n_routed_experts": 65536)");
  absl::StatusOr<ModelConfig> r = ParseModelConfig(many_experts, "x/config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("expert instances exceeds the limit 262144"),
            std::string::npos)
      << r.status();

  std::string big_embedding =
      Replace(kV3Config, R"("vocab_size": 129280)", R"("vocab_size": 4194304)");
  big_embedding = Replace(big_embedding, R"("hidden_size": 7168)", R"("hidden_size": 65536)");
  r = ParseModelConfig(big_embedding, "x/config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("embed_tokens"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("exceeds the limit 8589934592"), std::string::npos)
      << r.status();

  // 1000 layers x 256 experts of 65536 x 7168: 3.6e17 parameters.
  std::string huge =
      Replace(kV3Config, R"("num_hidden_layers": 61)", R"("num_hidden_layers": 1000)");
  huge = Replace(huge, R"("moe_intermediate_size": 2048)", R"("moe_intermediate_size": 65536)");
  r = ParseModelConfig(huge, "x/config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("parameters, over the limit"), std::string::npos)
      << r.status();
}

// Real configs pass by a wide margin: twice V3 in every dimension still parses.
TEST(ModelConfigTest, BoundsLeaveRoomAboveRealModels) {
  std::string twice = kV3Config;
  for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
           {R"("num_hidden_layers": 61)", R"("num_hidden_layers": 122)"},
           {R"("n_routed_experts": 256)", R"("n_routed_experts": 512)"},
           {R"("num_experts_per_tok": 8)", R"("num_experts_per_tok": 16)"},
           {R"("hidden_size": 7168)", R"("hidden_size": 14336)"},
           {R"("vocab_size": 129280)", R"("vocab_size": 258560)"},
           {R"("num_attention_heads": 128)", R"("num_attention_heads": 256)"},
           {R"("max_position_embeddings": 163840)", R"("max_position_embeddings": 327680)"}}) {
    twice = Replace(twice, from, to);
  }
  absl::StatusOr<ModelConfig> r = ParseModelConfig(twice, "twice/config.json");
  EXPECT_TRUE(r.ok()) << r.status();
}

TEST(ModelConfigTest, RefusesNonFiniteNumbers) {
  absl::StatusOr<ModelConfig> r = ParseModelConfig(
      Replace(kV3Config, R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": 1e999)"),
      "inf/config.json");
  EXPECT_FALSE(r.ok());
}

// A value nested 400 000 deep (1 MB, within the size bound) is refused naming the field, with
// a bounded text of the value (printing it whole overflowed the stack; found by config_fuzz).
TEST(ModelConfigTest, RefusesDeeplyNestedValuesWithABoundedMessage) {
  const std::string deep = std::string(400000, '[') + std::string(400000, ']');
  absl::StatusOr<ModelConfig> r = ParseModelConfig(
      Replace(kV3Config, R"("num_hidden_layers": 61)", R"("num_hidden_layers": )" + deep),
      "deep/config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'num_hidden_layers' must be an integer, got [[[[...]]]]"),
            std::string::npos)
      << r.status().message().substr(0, 300);
  EXPECT_LT(r.status().message().size(), 400u);
}

TEST(ModelConfigTest, RefusesNonJson) {
  EXPECT_FALSE(ParseModelConfig("{not json", "x").ok());
  EXPECT_FALSE(ParseModelConfig("[1, 2]", "x").ok());
  EXPECT_FALSE(ParseModelConfig("", "x").ok());
}

}  // namespace
}  // namespace splitmoe::model
