#include "common/model/weights.h"

#include <set>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

namespace splitmoe::model {
namespace {

std::string LayerPrefix(int64_t layer) { return absl::StrCat("model.layers.", layer, "."); }

void AddMlpSpecs(const std::string& prefix, int64_t hidden, int64_t inter,
                 std::vector<TensorSpec>* out) {
  out->push_back({prefix + "gate_proj.weight", {inter, hidden}, true});
  out->push_back({prefix + "up_proj.weight", {inter, hidden}, true});
  out->push_back({prefix + "down_proj.weight", {hidden, inter}, true});
}

// The tensors of decoder block `layer` (main layers and MTP blocks share the layout).
void AddBlockSpecs(const ModelConfig& c, int64_t layer, std::vector<TensorSpec>* out) {
  const std::string p = LayerPrefix(layer);
  const int64_t h = c.hidden_size, heads = c.num_attention_heads;
  out->push_back({p + "input_layernorm.weight", {h}});
  out->push_back({p + "post_attention_layernorm.weight", {h}});
  const std::string a = p + "self_attn.";
  if (c.q_lora_rank > 0) {
    out->push_back({a + "q_a_proj.weight", {c.q_lora_rank, h}, true});
    out->push_back({a + "q_a_layernorm.weight", {c.q_lora_rank}});
    out->push_back({a + "q_b_proj.weight", {heads * c.qk_head_dim(), c.q_lora_rank}, true});
  } else {
    out->push_back({a + "q_proj.weight", {heads * c.qk_head_dim(), h}, true});
  }
  out->push_back({a + "kv_a_proj_with_mqa.weight", {c.latent_dim(), h}, true});
  out->push_back({a + "kv_a_layernorm.weight", {c.kv_lora_rank}});
  out->push_back({a + "kv_b_proj.weight",
                  {heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank},
                  true});
  out->push_back({a + "o_proj.weight", {h, heads * c.v_head_dim}, true});
  if (c.IsMoeLayer(layer)) {
    out->push_back({p + "mlp.gate.weight", {c.n_routed_experts, h}});
    if (c.HasScoreBias())
      out->push_back({p + "mlp.gate.e_score_correction_bias", {c.n_routed_experts}});
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      AddMlpSpecs(absl::StrCat(p, "mlp.experts.", e, "."), h, c.moe_intermediate_size, out);
    }
    if (c.n_shared_experts > 0) {
      AddMlpSpecs(p + "mlp.shared_experts.", h, c.n_shared_experts * c.moe_intermediate_size, out);
    }
  } else {
    AddMlpSpecs(p + "mlp.", h, c.intermediate_size, out);
  }
}

class WeightLoader {
 public:
  WeightLoader(Checkpoint& ckpt, const LoadOptions& options)
      : ckpt_(ckpt), c_(ckpt.config()), options_(options) {}

  absl::Status LoadMlp(const std::string& prefix, int64_t inter, MlpWeights* mlp) {
    const int64_t h = c_.hidden_size;
    SPLITMOE_ASSIGN_OR_RETURN(mlp->gate, ckpt_.LoadMatrix(prefix + "gate_proj.weight", inter, h, options_.resident));
    SPLITMOE_ASSIGN_OR_RETURN(mlp->up, ckpt_.LoadMatrix(prefix + "up_proj.weight", inter, h, options_.resident));
    SPLITMOE_ASSIGN_OR_RETURN(mlp->down, ckpt_.LoadMatrix(prefix + "down_proj.weight", h, inter, options_.resident));
    return absl::OkStatus();
  }

  absl::Status LoadBlock(int64_t layer, LayerWeights* w) {
    const std::string p = LayerPrefix(layer);
    const int64_t h = c_.hidden_size, heads = c_.num_attention_heads;
    w->is_moe = c_.IsMoeLayer(layer);
    if (options_.attention_side) {
      w->has_attention = true;
      SPLITMOE_ASSIGN_OR_RETURN(w->input_norm, ckpt_.LoadVector(p + "input_layernorm.weight", h));
      SPLITMOE_ASSIGN_OR_RETURN(w->post_attention_norm,
                                ckpt_.LoadVector(p + "post_attention_layernorm.weight", h));
      const std::string a = p + "self_attn.";
      AttentionWeights& at = w->attn;
      if (c_.q_lora_rank > 0) {
        SPLITMOE_ASSIGN_OR_RETURN(at.q_a_proj,
                                  ckpt_.LoadMatrix(a + "q_a_proj.weight", c_.q_lora_rank, h, options_.resident));
        SPLITMOE_ASSIGN_OR_RETURN(at.q_a_norm,
                                  ckpt_.LoadVector(a + "q_a_layernorm.weight", c_.q_lora_rank));
        SPLITMOE_ASSIGN_OR_RETURN(
            at.q_b_proj,
            ckpt_.LoadMatrix(a + "q_b_proj.weight", heads * c_.qk_head_dim(), c_.q_lora_rank, options_.resident));
      } else {
        SPLITMOE_ASSIGN_OR_RETURN(
            at.q_proj, ckpt_.LoadMatrix(a + "q_proj.weight", heads * c_.qk_head_dim(), h, options_.resident));
      }
      SPLITMOE_ASSIGN_OR_RETURN(
          at.kv_a_proj, ckpt_.LoadMatrix(a + "kv_a_proj_with_mqa.weight", c_.latent_dim(), h, options_.resident));
      SPLITMOE_ASSIGN_OR_RETURN(at.kv_a_norm,
                                ckpt_.LoadVector(a + "kv_a_layernorm.weight", c_.kv_lora_rank));
      SPLITMOE_ASSIGN_OR_RETURN(
          at.kv_b_proj,
          ckpt_.LoadMatrix(a + "kv_b_proj.weight", heads * (c_.qk_nope_head_dim + c_.v_head_dim),
                           c_.kv_lora_rank, options_.resident));
      SPLITMOE_ASSIGN_OR_RETURN(at.o_proj,
                                ckpt_.LoadMatrix(a + "o_proj.weight", h, heads * c_.v_head_dim, options_.resident));
      if (w->is_moe) {
        SPLITMOE_ASSIGN_OR_RETURN(w->gate,
                                  ckpt_.LoadMatrix(p + "mlp.gate.weight", c_.n_routed_experts, h, options_.resident));
        if (c_.HasScoreBias()) {
          SPLITMOE_ASSIGN_OR_RETURN(
              w->gate_bias,
              ckpt_.LoadVector(p + "mlp.gate.e_score_correction_bias", c_.n_routed_experts));
        }
        if (c_.n_shared_experts > 0) {
          SPLITMOE_RETURN_IF_ERROR(LoadMlp(p + "mlp.shared_experts.",
                                           c_.n_shared_experts * c_.moe_intermediate_size,
                                           &w->shared));
        }
      } else {
        SPLITMOE_RETURN_IF_ERROR(LoadMlp(p + "mlp.", c_.intermediate_size, &w->dense));
      }
    }
    if (w->is_moe) {
      w->experts.resize(static_cast<size_t>(c_.n_routed_experts));
      if (options_.routed_experts) {
        for (int64_t e = 0; e < c_.n_routed_experts; ++e) {
          if (options_.expert_filter && !options_.expert_filter(layer, e)) continue;
          auto mlp = std::make_unique<MlpWeights>();
          SPLITMOE_RETURN_IF_ERROR(LoadMlp(absl::StrCat(p, "mlp.experts.", e, "."),
                                           c_.moe_intermediate_size, mlp.get()));
          w->experts[static_cast<size_t>(e)] = std::move(mlp);
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status LoadMtp(int64_t k, MtpWeights* m) {
    const int64_t layer = c_.num_hidden_layers + k;
    const std::string p = LayerPrefix(layer);
    const int64_t h = c_.hidden_size;
    if (options_.attention_side) {
      SPLITMOE_ASSIGN_OR_RETURN(m->embed,
                                ckpt_.LoadMatrix(p + "embed_tokens.weight", c_.vocab_size, h, options_.resident));
      SPLITMOE_ASSIGN_OR_RETURN(m->enorm, ckpt_.LoadVector(p + "enorm.weight", h));
      SPLITMOE_ASSIGN_OR_RETURN(m->hnorm, ckpt_.LoadVector(p + "hnorm.weight", h));
      SPLITMOE_ASSIGN_OR_RETURN(m->eh_proj, ckpt_.LoadMatrix(p + "eh_proj.weight", h, 2 * h, options_.resident));
      SPLITMOE_ASSIGN_OR_RETURN(m->head_norm, ckpt_.LoadVector(p + "shared_head.norm.weight", h));
      SPLITMOE_ASSIGN_OR_RETURN(m->head,
                                ckpt_.LoadMatrix(p + "shared_head.head.weight", c_.vocab_size, h, options_.resident));
    }
    return LoadBlock(layer, &m->block);
  }

 private:
  Checkpoint& ckpt_;
  const ModelConfig& c_;
  const LoadOptions& options_;
};

// MTP modules are optional in practice: many exports keep num_nextn_predict_layers in the config
// but drop the tensors. All of a module's tensors or none; a partial module is an error.
absl::StatusOr<int64_t> PresentMtpModules(const Checkpoint& ckpt) {
  const ModelConfig& c = ckpt.config();
  int64_t present = 0;
  const std::vector<TensorSpec> all = TensorLayout(c, true);
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const std::string prefix = LayerPrefix(c.num_hidden_layers + k);
    int64_t found = 0, expected = 0;
    for (const TensorSpec& s : all) {
      if (!absl::StartsWith(s.name, prefix)) continue;
      ++expected;
      if (ckpt.Has(s.name)) ++found;
    }
    if (found == 0) break;
    if (found != expected) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": MTP module ", k, " (", prefix,
                                                     "*) has ", found, " of its ", expected,
                                                     " tensors"));
    }
    ++present;
  }
  return present;
}

}  // namespace

std::vector<TensorSpec> TensorLayout(const ModelConfig& c, bool include_mtp) {
  std::vector<TensorSpec> out;
  const int64_t h = c.hidden_size;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) AddBlockSpecs(c, layer, &out);
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  if (include_mtp) {
    for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
      const int64_t layer = c.num_hidden_layers + k;
      const std::string p = LayerPrefix(layer);
      out.push_back({p + "embed_tokens.weight", {c.vocab_size, h}});
      out.push_back({p + "enorm.weight", {h}});
      out.push_back({p + "hnorm.weight", {h}});
      out.push_back({p + "eh_proj.weight", {h, 2 * h}, true});
      AddBlockSpecs(c, layer, &out);
      out.push_back({p + "shared_head.norm.weight", {h}});
      out.push_back({p + "shared_head.head.weight", {c.vocab_size, h}});
    }
  }
  return out;
}

uint64_t ModelWeights::bytes() const {
  auto vec = [](const std::vector<float>& v) { return v.size() * sizeof(float); };
  auto layer_bytes = [&](const LayerWeights& l) {
    uint64_t b = vec(l.input_norm) + vec(l.post_attention_norm) + l.attn.q_proj.bytes() +
                 l.attn.q_a_proj.bytes() + vec(l.attn.q_a_norm) + l.attn.q_b_proj.bytes() +
                 l.attn.kv_a_proj.bytes() + vec(l.attn.kv_a_norm) + l.attn.kv_b_proj.bytes() +
                 l.attn.o_proj.bytes() + l.dense.bytes() + l.gate.bytes() + vec(l.gate_bias) +
                 l.shared.bytes();
    for (const auto& e : l.experts) b += e ? e->bytes() : 0;
    return b;
  };
  uint64_t total = embed.bytes() + vec(final_norm) + lm_head.bytes();
  for (const LayerWeights& l : layers) total += layer_bytes(l);
  for (const MtpWeights& m : mtp) {
    total += m.embed.bytes() + vec(m.enorm) + vec(m.hnorm) + m.eh_proj.bytes() + vec(m.head_norm) +
             m.head.bytes() + layer_bytes(m.block);
  }
  return total;
}

absl::StatusOr<ModelWeights> LoadWeights(Checkpoint& ckpt, const LoadOptions& options) {
  const ModelConfig& c = ckpt.config();
  // Tensors the model does not use mean the config and the weights disagree: refuse them.
  {
    std::set<std::string> known;
    for (const TensorSpec& s : TensorLayout(c, true)) {
      known.insert(s.name);
      if (s.quantizable) known.insert(s.name + "_scale_inv");
    }
    for (const std::string& name : ckpt.tensor_names()) {
      if (known.count(name) || absl::EndsWith(name, "rotary_emb.inv_freq")) continue;
      // Some exports keep lm_head.weight although the config ties it to the embeddings; HF then
      // ties anyway and ignores it, and so does this loader.
      if (c.tie_word_embeddings && name == "lm_head.weight") continue;
      return absl::InvalidArgumentError(absl::StrCat(
          ckpt.dir(), ": unexpected tensor '", name,
          "' (not part of the model config.json describes: check num_hidden_layers, "
          "n_routed_experts, q_lora_rank, first_k_dense_replace, tie_word_embeddings)"));
    }
  }
  ModelWeights w;
  WeightLoader loader(ckpt, options);
  const int64_t h = c.hidden_size;
  if (options.attention_side) {
    SPLITMOE_ASSIGN_OR_RETURN(w.embed,
                              ckpt.LoadMatrix("model.embed_tokens.weight", c.vocab_size, h, options.resident));
    SPLITMOE_ASSIGN_OR_RETURN(w.final_norm, ckpt.LoadVector("model.norm.weight", h));
    if (c.tie_word_embeddings) {
      w.lm_head = w.embed;
    } else {
      SPLITMOE_ASSIGN_OR_RETURN(w.lm_head, ckpt.LoadMatrix("lm_head.weight", c.vocab_size, h, options.resident));
    }
  }
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    SPLITMOE_RETURN_IF_ERROR(
        Annotate(loader.LoadBlock(layer, &w.layers[static_cast<size_t>(layer)]),
                 absl::StrCat("loading layer ", layer)));
  }
  if (options.mtp) {
    SPLITMOE_ASSIGN_OR_RETURN(int64_t modules, PresentMtpModules(ckpt));
    w.mtp.resize(static_cast<size_t>(modules));
    for (int64_t k = 0; k < modules; ++k) {
      SPLITMOE_RETURN_IF_ERROR(Annotate(loader.LoadMtp(k, &w.mtp[static_cast<size_t>(k)]),
                                        absl::StrCat("loading MTP module ", k)));
    }
  }
  ckpt.LogProgress(/*final=*/true);
  return w;
}

}  // namespace splitmoe::model
