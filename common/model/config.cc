#include "common/model/config.h"

#include <cmath>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/base/file.h"
#include "common/base/json_text.h"
#include "common/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace splitmoe::model {
namespace {

using nlohmann::json;

// Reads an integer field; `required` fields must be present and non-null. Values outside int64
// (a huge unsigned or float) are refused here, before they can wrap into something plausible.
absl::Status ReadInt(const json& j, const char* key, bool required, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return absl::InvalidArgumentError(absl::StrCat("missing field '", key, "'"));
    return absl::OkStatus();
  }
  if (it->is_number_unsigned()) {
    const uint64_t v = it->get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat("field '", key, "' = ", v, " is out of range"));
    }
    *out = static_cast<int64_t>(v);
    return absl::OkStatus();
  }
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }
  if (it->is_number_float() && std::floor(it->get<double>()) == it->get<double>()) {
    const double v = it->get<double>();
    // 2^63 is the first double past int64's range; casting it or more is undefined.
    if (!(std::fabs(v) < 0x1p63)) {
      return absl::InvalidArgumentError(
          absl::StrCat("field '", key, "' = ", JsonForError(*it), " is out of range"));
    }
    *out = static_cast<int64_t>(v);
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("field '", key, "' must be an integer, got ", JsonForError(*it)));
}

absl::Status ReadDouble(const json& j, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number() || !std::isfinite(it->get<double>())) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", key, "' must be a finite number, got ", JsonForError(*it)));
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status ReadBool(const json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", key, "' must be a boolean, got ", JsonForError(*it)));
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

// Upper bounds on every size-like field, checked before anything is sized by them. Each is
// far above every published DeepSeek-V2/V3/R1 config.json (V3: hidden 7168, intermediate 18432,
// moe_intermediate 2048, vocab 129280, 61 layers, 128 heads, q_lora 1536, kv_lora 512, head dims
// 128/64/128, 256 routed experts + 1 shared, 8 per token, 8 groups, max_position 163840, 1 MTP
// layer) and low enough that no field alone can make a loader allocate absurdly.
struct FieldBound {
  const char* name;
  int64_t value;
  int64_t min;
  int64_t max;
};

absl::Status CheckBounds(const ModelConfig& c) {
  constexpr int64_t kMaxLayers = 1024;
  constexpr int64_t kMaxPositions = int64_t{1} << 24;  // 16M tokens
  const FieldBound bounds[] = {
      {"vocab_size", c.vocab_size, 1, int64_t{1} << 22},
      {"hidden_size", c.hidden_size, 1, int64_t{1} << 16},
      {"intermediate_size", c.intermediate_size, 0, int64_t{1} << 18},
      {"moe_intermediate_size", c.moe_intermediate_size, 0, int64_t{1} << 16},
      {"num_hidden_layers", c.num_hidden_layers, 1, kMaxLayers},
      {"num_attention_heads", c.num_attention_heads, 1, 4096},
      {"q_lora_rank", c.q_lora_rank, 0, int64_t{1} << 16},
      {"kv_lora_rank", c.kv_lora_rank, 1, int64_t{1} << 16},
      {"qk_nope_head_dim", c.qk_nope_head_dim, 0, 4096},
      {"qk_rope_head_dim", c.qk_rope_head_dim, 1, 4096},
      {"v_head_dim", c.v_head_dim, 1, 4096},
      {"n_shared_experts", c.n_shared_experts, 0, 1024},
      {"n_routed_experts", c.n_routed_experts, 0, 65536},
      {"num_experts_per_tok", c.num_experts_per_tok, 0, 4096},
      {"n_group", c.n_group, 0, 65536},
      {"topk_group", c.topk_group, 0, 65536},
      {"first_k_dense_replace", c.first_k_dense_replace, 0, kMaxLayers},
      {"moe_layer_freq", c.moe_layer_freq, 1, kMaxLayers},
      {"max_position_embeddings", c.max_position_embeddings, 1, kMaxPositions},
      {"num_nextn_predict_layers", c.num_nextn_predict_layers, 0, 64},
      {"rope_scaling.original_max_position_embeddings", c.yarn.original_max_position_embeddings, 1,
       kMaxPositions},
      {"bos_token_id", c.bos_token_id, -1, c.vocab_size - 1},
      {"eos_token_id", c.eos_token_id, -1, c.vocab_size - 1},
  };
  for (const FieldBound& b : bounds) {
    if (b.value > b.max) {
      if (absl::EndsWith(b.name, "token_id")) {
        return absl::InvalidArgumentError(
            absl::StrCat(b.name, " = ", b.value, " lies outside vocab_size ", c.vocab_size));
      }
      return absl::InvalidArgumentError(
          absl::StrCat(b.name, " = ", b.value, " exceeds the limit ", b.max));
    }
    if (b.value < b.min) {
      return absl::InvalidArgumentError(absl::StrCat(
          b.name, " must be ", b.min == 1 ? "> 0" : absl::StrCat(">= ", b.min), ", got ", b.value));
    }
  }
  return absl::OkStatus();
}

// Bounds on what the fields imply together: the routed experts a full load holds (each one a
// LayerWeights slot and three tensor names before any data is read), the largest single tensor
// and the whole parameter count. V3 (with its MTP layer): 59 x 256 = 15104 expert instances, its
// largest tensor the 129280 x 7168 embedding (0.93 G elements), 685 G parameters. Runs after
// CheckBounds, which keeps every product below int64's range.
absl::Status CheckDerivedBounds(const ModelConfig& c) {
  constexpr int64_t kMaxExpertInstances = int64_t{1} << 18;
  constexpr int64_t kMaxTensorElements = int64_t{1} << 33;
  constexpr double kMaxParameters = 0x1p43;  // 8.8 T
  const int64_t blocks = c.num_hidden_layers + c.num_nextn_predict_layers;
  int64_t moe_blocks = 0;
  for (int64_t layer = 0; layer < blocks; ++layer) moe_blocks += c.IsMoeLayer(layer) ? 1 : 0;
  if (moe_blocks * c.n_routed_experts > kMaxExpertInstances) {
    return absl::InvalidArgumentError(
        absl::StrCat(moe_blocks, " MoE layers (num_hidden_layers + num_nextn_predict_layers) x ",
                     c.n_routed_experts, " n_routed_experts = ", moe_blocks * c.n_routed_experts,
                     " expert instances exceeds the limit ", kMaxExpertInstances));
  }
  const int64_t h = c.hidden_size, heads = c.num_attention_heads;
  const int64_t q_in = c.q_lora_rank > 0 ? c.q_lora_rank : h;
  const int64_t shared_inter = c.n_shared_experts * c.moe_intermediate_size;
  struct Tensor {
    const char* what;
    int64_t rows, cols;
  } const tensors[] = {
      {"embed_tokens / lm_head (vocab_size x hidden_size)", c.vocab_size, h},
      {"q_proj / q_b_proj (num_attention_heads * qk_head_dim x q_lora_rank or hidden_size)",
       heads * c.qk_head_dim(), q_in},
      {"q_a_proj (q_lora_rank x hidden_size)", c.q_lora_rank, h},
      {"kv_a_proj_with_mqa (kv_lora_rank + qk_rope_head_dim x hidden_size)", c.latent_dim(), h},
      {"kv_b_proj (num_attention_heads * (qk_nope_head_dim + v_head_dim) x kv_lora_rank)",
       heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank},
      {"o_proj (hidden_size x num_attention_heads * v_head_dim)", h, heads * c.v_head_dim},
      {"dense mlp (intermediate_size x hidden_size)", c.intermediate_size, h},
      {"shared experts (n_shared_experts * moe_intermediate_size x hidden_size)", shared_inter, h},
      {"eh_proj (hidden_size x 2 * hidden_size)", h, 2 * h},
  };
  for (const Tensor& t : tensors) {
    if (t.rows * t.cols > kMaxTensorElements) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.what, " = ", t.rows, " x ",
                                                     t.cols, " elements exceeds the limit ",
                                                     kMaxTensorElements));
    }
  }
  // Parameters per decoder block (attention + its MLP), in double: an estimate, never wraps.
  auto d = [](int64_t v) { return static_cast<double>(v); };
  const double attention = d(heads * c.qk_head_dim()) * d(q_in) + d(c.q_lora_rank) * d(h) +
                           d(c.latent_dim()) * d(h) +
                           d(heads * (c.qk_nope_head_dim + c.v_head_dim)) * d(c.kv_lora_rank) +
                           d(h) * d(heads * c.v_head_dim);
  const double dense_mlp = 3 * d(c.intermediate_size) * d(h);
  const double moe_mlp = 3 * d(c.moe_intermediate_size) * d(h) * d(c.n_routed_experts) +
                         3 * d(shared_inter) * d(h) + d(c.n_routed_experts) * d(h);
  const double parameters = d(blocks) * attention + d(moe_blocks) * moe_mlp +
                            d(blocks - moe_blocks) * dense_mlp +
                            d(2 + 2 * c.num_nextn_predict_layers) * d(c.vocab_size) * d(h) +
                            d(c.num_nextn_predict_layers) * 2 * d(h) * d(h);
  if (parameters > kMaxParameters) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the config implies ", absl::StrFormat("%.4g", parameters),
        " parameters, over the limit of ", absl::StrFormat("%.4g", kMaxParameters),
        " (check num_hidden_layers, hidden_size, n_routed_experts, moe_intermediate_size)"));
  }
  return absl::OkStatus();
}

absl::Status Validate(const ModelConfig& c) {
  auto positive = [](int64_t v, const char* name) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(name, " must be > 0, got ", v));
    return absl::OkStatus();
  };
  SPLITMOE_RETURN_IF_ERROR(CheckBounds(c));
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
  return CheckDerivedBounds(c);
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
    std::string m = it->is_string() ? it->get<std::string>() : JsonForError(*it);
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
    std::string f = it->is_string() ? it->get<std::string>() : JsonForError(*it);
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
  const std::string path = absl::StrCat(model_dir, "/config.json");
  SPLITMOE_ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, kMaxConfigJsonBytes));
  return ParseModelConfig(text, path);
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
