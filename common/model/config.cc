#include "common/model/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace splitmoe::model {
namespace {

using nlohmann::json;

// Reads an integer field; `required` fields must be present and non-null.
absl::Status ReadInt(const json& j, const char* key, bool required, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return absl::InvalidArgumentError(absl::StrCat("missing field '", key, "'"));
    return absl::OkStatus();
  }
  if (it->is_number_integer() || it->is_number_unsigned()) {
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }
  if (it->is_number_float() && std::floor(it->get<double>()) == it->get<double>()) {
    *out = static_cast<int64_t>(it->get<double>());
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("field '", key, "' must be an integer, got ", it->dump()));
}

absl::Status ReadDouble(const json& j, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", key, "' must be a number, got ", it->dump()));
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status ReadBool(const json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", key, "' must be a boolean, got ", it->dump()));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

// bos/eos ids may be an int or a list of ints (some exports); the first counts.
absl::Status ReadTokenId(const json& j, const char* key, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (it->is_array() && !it->empty()) {
    json first = {{key, (*it)[0]}};
    return ReadInt(first, key, false, out);
  }
  return ReadInt(j, key, false, out);
}

absl::Status Validate(const ModelConfig& c) {
  auto positive = [](int64_t v, const char* name) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(name, " must be > 0, got ", v));
    return absl::OkStatus();
  };
  SPLITMOE_RETURN_IF_ERROR(positive(c.vocab_size, "vocab_size"));
  SPLITMOE_RETURN_IF_ERROR(positive(c.hidden_size, "hidden_size"));
  SPLITMOE_RETURN_IF_ERROR(positive(c.num_hidden_layers, "num_hidden_layers"));
  SPLITMOE_RETURN_IF_ERROR(positive(c.num_attention_heads, "num_attention_heads"));
  SPLITMOE_RETURN_IF_ERROR(positive(c.kv_lora_rank, "kv_lora_rank"));
  SPLITMOE_RETURN_IF_ERROR(positive(c.qk_rope_head_dim, "qk_rope_head_dim"));
  SPLITMOE_RETURN_IF_ERROR(positive(c.v_head_dim, "v_head_dim"));
  SPLITMOE_RETURN_IF_ERROR(positive(c.max_position_embeddings, "max_position_embeddings"));
  if (c.qk_nope_head_dim < 0 || c.q_lora_rank < 0 || c.n_shared_experts < 0 ||
      c.n_routed_experts < 0 || c.first_k_dense_replace < 0 || c.num_nextn_predict_layers < 0) {
    return absl::InvalidArgumentError("negative dimension or count");
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "qk_rope_head_dim must be even (RoPE rotates pairs), got ", c.qk_rope_head_dim));
  }
  if (!(c.rms_norm_eps > 0)) return absl::InvalidArgumentError("rms_norm_eps must be > 0");
  if (!(c.rope_theta > 1)) return absl::InvalidArgumentError("rope_theta must be > 1");
  bool any_dense = c.n_routed_experts == 0 || c.first_k_dense_replace > 0 || c.moe_layer_freq > 1;
  if (any_dense) SPLITMOE_RETURN_IF_ERROR(positive(c.intermediate_size, "intermediate_size"));
  if (c.n_routed_experts > 0) {
    SPLITMOE_RETURN_IF_ERROR(positive(c.moe_intermediate_size, "moe_intermediate_size"));
    SPLITMOE_RETURN_IF_ERROR(positive(c.moe_layer_freq, "moe_layer_freq"));
    if (c.num_experts_per_tok <= 0 || c.num_experts_per_tok > c.n_routed_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_experts_per_tok must be in [1, n_routed_experts=", c.n_routed_experts,
                       "], got ", c.num_experts_per_tok));
    }
    if (c.n_group <= 0 || c.n_routed_experts % c.n_group != 0) {
      return absl::InvalidArgumentError(absl::StrCat("n_routed_experts (", c.n_routed_experts,
                                                     ") must be a multiple of n_group (", c.n_group,
                                                     ")"));
    }
    if (c.UsesGroups()) {
      if (c.topk_group <= 0 || c.topk_group > c.n_group) {
        return absl::InvalidArgumentError(
            absl::StrCat("topk_group must be in [1, n_group=", c.n_group, "], got ", c.topk_group));
      }
      int64_t per_group = c.n_routed_experts / c.n_group;
      if (c.topk_group * per_group < c.num_experts_per_tok) {
        return absl::InvalidArgumentError(absl::StrCat(
            "topk_group (", c.topk_group, ") groups of ", per_group,
            " experts cannot hold num_experts_per_tok (", c.num_experts_per_tok, ") experts"));
      }
      if (c.topk_method == TopkMethod::kNoauxTc && per_group < 2) {
        return absl::InvalidArgumentError(
            "noaux_tc scores groups by their top-2: need >= 2 experts per group");
      }
    }
    if (!(c.routed_scaling_factor > 0)) {
      return absl::InvalidArgumentError("routed_scaling_factor must be > 0");
    }
  }
  if (c.yarn.enabled && !(c.yarn.factor >= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rope_scaling.factor must be >= 1, got ", c.yarn.factor));
  }
  if (c.bos_token_id >= c.vocab_size || c.eos_token_id >= c.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("bos/eos token id outside vocab_size ", c.vocab_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseJson(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("top level is not a JSON object");
  ModelConfig c;
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "vocab_size", true, &c.vocab_size));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "hidden_size", true, &c.hidden_size));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "intermediate_size", false, &c.intermediate_size));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "moe_intermediate_size", false, &c.moe_intermediate_size));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "num_hidden_layers", true, &c.num_hidden_layers));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "num_attention_heads", true, &c.num_attention_heads));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "q_lora_rank", false, &c.q_lora_rank));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "kv_lora_rank", true, &c.kv_lora_rank));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "qk_nope_head_dim", true, &c.qk_nope_head_dim));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "qk_rope_head_dim", true, &c.qk_rope_head_dim));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "v_head_dim", true, &c.v_head_dim));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "n_shared_experts", false, &c.n_shared_experts));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "n_routed_experts", false, &c.n_routed_experts));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "num_experts_per_tok", false, &c.num_experts_per_tok));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "n_group", false, &c.n_group));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "topk_group", false, &c.topk_group));
  if (auto it = j.find("topk_method"); it != j.end() && !it->is_null()) {
    std::string m = it->is_string() ? it->get<std::string>() : it->dump();
    if (m == "greedy")
      c.topk_method = TopkMethod::kGreedy;
    else if (m == "group_limited_greedy")
      c.topk_method = TopkMethod::kGroupLimitedGreedy;
    else if (m == "noaux_tc")
      c.topk_method = TopkMethod::kNoauxTc;
    else
      return absl::InvalidArgumentError(absl::StrCat("unknown topk_method '", m, "'"));
  }
  if (auto it = j.find("scoring_func"); it != j.end() && !it->is_null()) {
    std::string f = it->is_string() ? it->get<std::string>() : it->dump();
    if (f == "softmax")
      c.scoring_func = ScoringFunc::kSoftmax;
    else if (f == "sigmoid")
      c.scoring_func = ScoringFunc::kSigmoid;
    else
      return absl::InvalidArgumentError(absl::StrCat("unknown scoring_func '", f, "'"));
  }
  SPLITMOE_RETURN_IF_ERROR(ReadBool(j, "norm_topk_prob", &c.norm_topk_prob));
  SPLITMOE_RETURN_IF_ERROR(ReadDouble(j, "routed_scaling_factor", &c.routed_scaling_factor));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "first_k_dense_replace", false, &c.first_k_dense_replace));
  SPLITMOE_RETURN_IF_ERROR(ReadInt(j, "moe_layer_freq", false, &c.moe_layer_freq));
  SPLITMOE_RETURN_IF_ERROR(ReadDouble(j, "rms_norm_eps", &c.rms_norm_eps));
  SPLITMOE_RETURN_IF_ERROR(ReadDouble(j, "rope_theta", &c.rope_theta));
  SPLITMOE_RETURN_IF_ERROR(
      ReadInt(j, "max_position_embeddings", false, &c.max_position_embeddings));
  SPLITMOE_RETURN_IF_ERROR(ReadBool(j, "tie_word_embeddings", &c.tie_word_embeddings));
  SPLITMOE_RETURN_IF_ERROR(
      ReadInt(j, "num_nextn_predict_layers", false, &c.num_nextn_predict_layers));
  SPLITMOE_RETURN_IF_ERROR(ReadTokenId(j, "bos_token_id", &c.bos_token_id));
  SPLITMOE_RETURN_IF_ERROR(ReadTokenId(j, "eos_token_id", &c.eos_token_id));
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    const json& rs = *it;
    if (!rs.is_object())
      return absl::InvalidArgumentError("rope_scaling must be an object or null");
    std::string type;
    if (rs.contains("type") && rs["type"].is_string()) type = rs["type"].get<std::string>();
    if (rs.contains("rope_type") && rs["rope_type"].is_string())
      type = rs["rope_type"].get<std::string>();
    if (type != "yarn") {
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported rope_scaling type '", type, "' (DeepSeek-V2/V3 use yarn)"));
    }
    YarnScaling& y = c.yarn;
    SPLITMOE_RETURN_IF_ERROR(ReadDouble(rs, "factor", &y.factor));
    SPLITMOE_RETURN_IF_ERROR(ReadInt(rs, "original_max_position_embeddings", false,
                                     &y.original_max_position_embeddings));
    SPLITMOE_RETURN_IF_ERROR(ReadDouble(rs, "beta_fast", &y.beta_fast));
    SPLITMOE_RETURN_IF_ERROR(ReadDouble(rs, "beta_slow", &y.beta_slow));
    SPLITMOE_RETURN_IF_ERROR(ReadDouble(rs, "mscale", &y.mscale));
    SPLITMOE_RETURN_IF_ERROR(ReadDouble(rs, "mscale_all_dim", &y.mscale_all_dim));
    if (y.original_max_position_embeddings <= 0) {
      return absl::InvalidArgumentError(
          "rope_scaling.original_max_position_embeddings must be > 0");
    }
    // Applied whenever the config asks for it, as HF's DeepseekV3YarnRotaryEmbedding does and as
    // DeepSeek's reference does at its default max_seq_len (16384 > any original length shipped).
    // Gating on max_position_embeddings would silently drop YaRN for small test configs.
    y.enabled = true;
  }
  SPLITMOE_RETURN_IF_ERROR(Validate(c));
  return c;
}

}  // namespace

absl::string_view TopkMethodName(TopkMethod method) {
  switch (method) {
    case TopkMethod::kGreedy:
      return "greedy";
    case TopkMethod::kGroupLimitedGreedy:
      return "group_limited_greedy";
    case TopkMethod::kNoauxTc:
      return "noaux_tc";
  }
  return "?";
}

absl::string_view ScoringFuncName(ScoringFunc func) {
  return func == ScoringFunc::kSoftmax ? "softmax" : "sigmoid";
}

double ModelConfig::SoftmaxScale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (yarn.enabled && yarn.factor > 1.0) {
    double m = 0.1 * yarn.mscale_all_dim * std::log(yarn.factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text,
                                             absl::string_view source) {
  json j = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  absl::StatusOr<ModelConfig> config;
  try {
    config = ParseJson(j);
  } catch (const std::exception& e) {  // nlohmann type errors on hostile input
    config = absl::InvalidArgumentError(e.what());
  }
  if (!config.ok()) return Annotate(config.status(), source);
  return config;
}

absl::StatusOr<ModelConfig> LoadModelConfig(absl::string_view model_dir) {
  std::string path = absl::StrCat(model_dir, "/config.json");
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return ParseModelConfig(buffer.str(), path);
}

std::string ModelConfigToJson(const ModelConfig& c) {
  json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = "deepseek_v3";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_attention_heads;
  j["q_lora_rank"] = c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["n_shared_experts"] = c.n_shared_experts;
  j["n_routed_experts"] = c.n_routed_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["n_group"] = c.n_group;
  j["topk_group"] = c.topk_group;
  j["topk_method"] = std::string(TopkMethodName(c.topk_method));
  j["scoring_func"] = std::string(ScoringFuncName(c.scoring_func));
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe_layer_freq"] = c.moe_layer_freq;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.yarn.factor > 1.0) {
    j["rope_scaling"] = {
        {"type", "yarn"},
        {"factor", c.yarn.factor},
        {"original_max_position_embeddings", c.yarn.original_max_position_embeddings},
        {"beta_fast", c.yarn.beta_fast},
        {"beta_slow", c.yarn.beta_slow},
        {"mscale", c.yarn.mscale},
        {"mscale_all_dim", c.yarn.mscale_all_dim}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["hidden_act"] = "silu";
  j["torch_dtype"] = "bfloat16";
  return j.dump(2) + "\n";
}

}  // namespace splitmoe::model
