#include "common/model/tiny.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/base/mix64.h"
#include "absl/strings/str_format.h"
#include "common/base/status_macros.h"
#include "common/model/checkpoint.h"
#include "common/model/numeric.h"
#include "common/model/safetensors.h"
#include "common/model/weights.h"
#include "nlohmann/json.hpp"

namespace splitmoe::model {
namespace {

uint64_t HashName(const std::string& name, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ULL ^ Mix64(seed);
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ULL;
  return Mix64(h);
}

// Deterministic uniform in [-1, 1) from (stream, index); exact in binary floating point.
float UniformPm1(uint64_t stream, uint64_t index) {
  uint64_t bits = Mix64(stream ^ Mix64(index + 0x9e3779b97f4a7c15ULL));
  return static_cast<float>(static_cast<int64_t>(bits >> 40) - (int64_t{1} << 23)) * 0x1.0p-23f;
}

// The values of one tensor: uniform with the given standard deviation around `center`.
std::vector<float> TensorValues(const TensorSpec& spec, uint64_t seed, float center, float stddev,
                                const std::map<std::string, std::string>& shares) {
  int64_t numel = 1;
  for (int64_t d : spec.shape) numel *= d;
  // MTP embeddings are the main embeddings, as DeepSeek-V3 ships them; `shares` maps other
  // tensors to the ones they copy (the agreeing MTP module's head and head norm).
  std::string stream_name = spec.name;
  if (absl::EndsWith(spec.name, ".embed_tokens.weight")) stream_name = "model.embed_tokens.weight";
  if (auto it = shares.find(spec.name); it != shares.end()) stream_name = it->second;
  const uint64_t stream = HashName(stream_name, seed);
  std::vector<float> v(static_cast<size_t>(numel));
  const float half_width = stddev * std::sqrt(3.0f);
  for (int64_t i = 0; i < numel; ++i)
    v[i] = center + half_width * UniformPm1(stream, static_cast<uint64_t>(i));
  return v;
}

// Standard deviation (and centre) of each kind of tensor.
void Distribution(const TensorSpec& spec, const ModelConfig& c, double logit_scale,
                  double output_scale, float* center, float* stddev) {
  const std::string& n = spec.name;
  *center = 0.0f;
  if (absl::EndsWith(n, "norm.weight") || absl::EndsWith(n, "layernorm.weight")) {
    *center = 1.0f;
    *stddev = 0.1f;
  } else if (absl::EndsWith(n, "embed_tokens.weight")) {
    *stddev = 1.0f;
  } else if (absl::EndsWith(n, "e_score_correction_bias")) {
    *stddev = 0.03f;
  } else if (absl::EndsWith(n, "lm_head.weight") || absl::EndsWith(n, "shared_head.head.weight")) {
    *stddev = static_cast<float>(logit_scale / std::sqrt(static_cast<double>(c.hidden_size)));
  } else if (absl::EndsWith(n, "mlp.gate.weight")) {
    *stddev = static_cast<float>(2.0 / std::sqrt(static_cast<double>(c.hidden_size)));
  } else {
    const double fan_in = static_cast<double>(spec.shape.back());
    const bool output_proj =
        absl::EndsWith(n, "o_proj.weight") || absl::EndsWith(n, "down_proj.weight");
    *stddev = static_cast<float>((output_proj ? 0.5 * output_scale : 1.0) / std::sqrt(fan_in));
  }
}

std::vector<uint8_t> ToBf16Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 2);
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t b = FloatToBf16(v[i]);
    out[2 * i] = static_cast<uint8_t>(b & 0xff);
    out[2 * i + 1] = static_cast<uint8_t>(b >> 8);
  }
  return out;
}

// FP8 E4M3 with one fp32 scale per 128x128 block, as DeepSeek-V3 ships: w = q * scale_inv.
void QuantizeFp8(const std::vector<float>& w, int64_t rows, int64_t cols, std::vector<uint8_t>* q,
                 std::vector<uint8_t>* scale_bytes, std::vector<int64_t>* scale_shape) {
  const int64_t srows = (rows + kFp8BlockSize - 1) / kFp8BlockSize;
  const int64_t scols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  std::vector<float> scales(static_cast<size_t>(srows * scols), 1.0f);
  for (int64_t br = 0; br < srows; ++br) {
    for (int64_t bc = 0; bc < scols; ++bc) {
      float amax = 0.0f;
      for (int64_t r = br * kFp8BlockSize; r < std::min(rows, (br + 1) * kFp8BlockSize); ++r)
        for (int64_t col = bc * kFp8BlockSize; col < std::min(cols, (bc + 1) * kFp8BlockSize);
             ++col)
          amax = std::max(amax, std::fabs(w[r * cols + col]));
      if (amax > 0.0f) scales[br * scols + bc] = amax / kFp8E4M3Max;
    }
  }
  q->resize(w.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = 0; col < cols; ++col)
      (*q)[r * cols + col] = FloatToFp8E4M3(
          w[r * cols + col] / scales[(r / kFp8BlockSize) * scols + col / kFp8BlockSize]);
  scale_bytes->resize(scales.size() * 4);
  std::memcpy(scale_bytes->data(), scales.data(), scale_bytes->size());
  *scale_shape = {srows, scols};
}

absl::Status CopyFile(const std::string& from, const std::string& to) {
  std::error_code ec;
  std::filesystem::copy_file(from, to, std::filesystem::copy_options::overwrite_existing, ec);
  if (ec)
    return absl::NotFoundError(absl::StrCat("copying ", from, " to ", to, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> TinyModelConfig(const TinyModelOptions& o) {
  ModelConfig c;
  const bool v3 = o.style == "v3";
  if (!v3 && o.style != "v2" && o.style != "v2-greedy") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown style '", o.style, "' (v3, v2, v2-greedy)"));
  }
  auto pick = [](int64_t value, int64_t fallback) { return value > 0 ? value : fallback; };
  c.vocab_size = o.vocab_size;
  c.hidden_size = pick(o.hidden_size, 128);
  c.num_hidden_layers = pick(o.num_hidden_layers, 3);
  c.first_k_dense_replace = o.first_k_dense_replace >= 0 ? o.first_k_dense_replace : 1;
  c.num_attention_heads = pick(o.num_attention_heads, 4);
  c.q_lora_rank = o.q_lora_rank >= 0 ? o.q_lora_rank : (v3 ? 96 : 0);
  c.kv_lora_rank = pick(o.kv_lora_rank, 64);
  c.qk_nope_head_dim = pick(o.qk_nope_head_dim, 32);
  c.qk_rope_head_dim = pick(o.qk_rope_head_dim, 16);
  c.v_head_dim = pick(o.v_head_dim, 32);
  c.intermediate_size = pick(o.intermediate_size, 4 * c.hidden_size);
  c.moe_intermediate_size = pick(o.moe_intermediate_size, c.hidden_size / 2);
  c.n_routed_experts = pick(o.n_routed_experts, 16);
  c.n_shared_experts = o.n_shared_experts >= 0 ? o.n_shared_experts : (v3 ? 1 : 2);
  c.num_experts_per_tok = pick(o.num_experts_per_tok, v3 ? 4 : 3);
  if (o.style == "v2-greedy") {
    c.n_group = pick(o.n_group, 1);
    c.topk_group = pick(o.topk_group, 1);
    c.topk_method = TopkMethod::kGreedy;
  } else {
    c.n_group = pick(o.n_group, 4);
    c.topk_group = pick(o.topk_group, 2);
    c.topk_method = v3 ? TopkMethod::kNoauxTc : TopkMethod::kGroupLimitedGreedy;
  }
  c.scoring_func = v3 ? ScoringFunc::kSigmoid : ScoringFunc::kSoftmax;
  c.norm_topk_prob = v3;
  c.routed_scaling_factor = v3 ? 2.5 : 1.0;
  c.moe_layer_freq = 1;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = pick(o.max_position_embeddings, 163840);
  c.yarn.factor = 40.0;
  c.yarn.original_max_position_embeddings = 4096;
  c.yarn.beta_fast = 32.0;
  c.yarn.beta_slow = 1.0;
  c.yarn.mscale = v3 ? 1.0 : 0.707;
  c.yarn.mscale_all_dim = v3 ? 1.0 : 0.707;
  c.yarn.enabled = true;
  c.tie_word_embeddings = false;
  c.num_nextn_predict_layers = o.mtp_layers >= 0 ? o.mtp_layers : (v3 ? 1 : 0);
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  // Round trip through the parser: the same validation as any loaded checkpoint.
  return ParseModelConfig(ModelConfigToJson(c), "make-tiny config");
}

TinyModelOptions BenchModelOptions() {
  TinyModelOptions o;
  o.style = "v3";
  o.mtp_layers = 0;
  o.vocab_size = 32768;
  o.hidden_size = 1024;
  o.num_hidden_layers = 4;
  o.first_k_dense_replace = 1;
  o.num_attention_heads = 16;
  o.q_lora_rank = 384;
  o.kv_lora_rank = 256;
  o.qk_nope_head_dim = 64;
  o.qk_rope_head_dim = 32;
  o.v_head_dim = 64;
  o.intermediate_size = 2816;
  o.moe_intermediate_size = 512;
  o.n_routed_experts = 64;
  o.n_shared_experts = 1;
  o.num_experts_per_tok = 6;
  o.n_group = 8;
  o.topk_group = 4;
  return o;
}

absl::Status WriteTinyModel(const TinyModelOptions& o, const std::string& out_dir,
                            const std::string& tokenizer_dir) {
  SPLITMOE_ASSIGN_OR_RETURN(ModelConfig c, TinyModelConfig(o));
  if (o.mtp_draft != "random" && o.mtp_draft != "agree") {
    return absl::InvalidArgumentError(
        absl::StrCat("mtp draft must be random or agree, got '", o.mtp_draft, "'"));
  }
  if (o.mtp_draft == "agree" && c.num_nextn_predict_layers == 0) {
    return absl::InvalidArgumentError("an agreeing MTP module needs an MTP layer (--mtp 1)");
  }
  if (o.expert_skew < 0 || (o.expert_skew > 0 && c.topk_method != TopkMethod::kNoauxTc)) {
    return absl::InvalidArgumentError(
        "expert skew must be >= 0, and needs the v3 style (e_score_correction_bias)");
  }
  if (o.shards < 1 || o.shards > kMaxTinyShards) {
    return absl::InvalidArgumentError(
        absl::StrCat("shards must be in [1, ", kMaxTinyShards, "], got ", o.shards));
  }
  // The config's own bounds (ParseModelConfig) keep the layout's tensor list small; the bytes are
  // checked here, before anything is generated or written, since the writer holds them all.
  std::vector<TensorSpec> specs = TensorLayout(c, /*include_mtp=*/true);
  uint64_t total_bytes = 0;
  for (const TensorSpec& s : specs) {
    int64_t numel = 1;
    for (int64_t d : s.shape) numel *= d;
    total_bytes += static_cast<uint64_t>(numel) * 2;
  }
  if (total_bytes > kMaxTinyModelBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("make-tiny: the model would hold ", total_bytes,
                     " bytes of BF16 weights, over the limit of ", kMaxTinyModelBytes,
                     " (the writer keeps the whole checkpoint in memory): use smaller sizes"));
  }
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(out_dir, ": ", ec.message()));
  {
    std::ofstream cfg(out_dir + "/config.json", std::ios::trunc);
    cfg << ModelConfigToJson(c);
    if (!cfg) return absl::DataLossError(absl::StrCat(out_dir, "/config.json: write failed"));
  }
  // Assign tensors to shards in order, balancing bytes roughly.
  std::vector<std::vector<TensorToWrite>> shards(static_cast<size_t>(o.shards));
  uint64_t written = 0;
  std::map<std::string, std::string> weight_map;
  auto shard_name = [&](size_t i) {
    return o.shards == 1 ? std::string("model.safetensors")
                         : absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, o.shards);
  };
  const bool agree = o.mtp_draft == "agree";
  std::map<std::string, std::string> shares;
  for (int64_t k = 0; agree && k < c.num_nextn_predict_layers; ++k) {
    const std::string p = absl::StrCat("model.layers.", c.num_hidden_layers + k, ".");
    shares[p + "shared_head.head.weight"] = "lm_head.weight";
    shares[p + "shared_head.norm.weight"] = "model.norm.weight";
  }
  for (const TensorSpec& s : specs) {
    float center, stddev;
    Distribution(s, c, o.logit_scale, agree ? 0.05 : 1.0, &center, &stddev);
    std::vector<float> values = TensorValues(s, o.seed, center, stddev, shares);
    if (o.expert_skew > 0 && absl::EndsWith(s.name, "e_score_correction_bias")) {
      for (int64_t e = 0; e < std::min<int64_t>(c.num_experts_per_tok, c.n_routed_experts); ++e)
        values[static_cast<size_t>(e)] += static_cast<float>(o.expert_skew);
    }
    if (agree && absl::EndsWith(s.name, ".enorm.weight")) {
      std::fill(values.begin(), values.end(), 1.0f);
    } else if (agree && absl::EndsWith(s.name, ".eh_proj.weight")) {
      // [hidden, 2 * hidden]: the normed embedding passes, the hidden state does not.
      std::fill(values.begin(), values.end(), 0.0f);
      for (int64_t r = 0; r < c.hidden_size; ++r) values[static_cast<size_t>(r * 2 * c.hidden_size + r)] = 1.0f;
    }
    size_t shard = std::min<size_t>(static_cast<size_t>(written * static_cast<uint64_t>(o.shards) /
                                                        std::max<uint64_t>(total_bytes, 1)),
                                    shards.size() - 1);
    written += values.size() * 2;
    if (absl::EndsWith(s.name, "e_score_correction_bias")) {
      TensorToWrite t{s.name, DType::kF32, s.shape, std::vector<uint8_t>(values.size() * 4)};
      std::memcpy(t.data.data(), values.data(), t.data.size());
      shards[shard].push_back(std::move(t));
    } else if (o.fp8 && s.quantizable) {
      TensorToWrite q{s.name, DType::kF8E4M3, s.shape, {}};
      TensorToWrite scale{s.name + "_scale_inv", DType::kF32, {}, {}};
      QuantizeFp8(values, s.shape[0], s.shape[1], &q.data, &scale.data, &scale.shape);
      weight_map[scale.name] = shard_name(shard);
      shards[shard].push_back(std::move(q));
      shards[shard].push_back(std::move(scale));
    } else {
      shards[shard].push_back({s.name, DType::kBF16, s.shape, ToBf16Bytes(values)});
    }
    weight_map[s.name] = shard_name(shard);
  }
  for (size_t i = 0; i < shards.size(); ++i) {
    SPLITMOE_RETURN_IF_ERROR(WriteSafetensors(out_dir + "/" + shard_name(i), shards[i]));
  }
  if (o.shards > 1) {
    nlohmann::json index;
    index["metadata"] = {{"total_size", total_bytes}};
    index["weight_map"] = weight_map;
    std::ofstream out(out_dir + "/model.safetensors.index.json", std::ios::trunc);
    out << index.dump(2) << "\n";
  } else {
    std::filesystem::remove(out_dir + "/model.safetensors.index.json", ec);
  }
  if (!tokenizer_dir.empty()) {
    SPLITMOE_RETURN_IF_ERROR(
        CopyFile(tokenizer_dir + "/tokenizer.json", out_dir + "/tokenizer.json"));
    SPLITMOE_RETURN_IF_ERROR(
        CopyFile(tokenizer_dir + "/tokenizer_config.json", out_dir + "/tokenizer_config.json"));
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::model
