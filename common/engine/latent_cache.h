// LatentCache: the per-sequence MLA cache of the single-process engine. Per token and layer
// it holds exactly latent_dim = kv_lora_rank + qk_rope_head_dim fp32 values — the normalised
// c_kv followed by the rotated RoPE key — and nothing else; K and V are never cached.
// Owned by one sequence; not thread-safe.
//
//   LatentCache cache(config.num_hidden_layers, config.latent_dim());
//   float* row = cache.Row(layer, position);   // [latent_dim]
#ifndef SPLITMOE_COMMON_ENGINE_LATENT_CACHE_H_
#define SPLITMOE_COMMON_ENGINE_LATENT_CACHE_H_

#include <cstdint>
#include <vector>

namespace splitmoe::engine {

class LatentCache {
 public:
  LatentCache(int64_t layers, int64_t latent_dim) : latent_dim_(latent_dim), layers_(layers) {
    per_layer_.resize(static_cast<size_t>(layers));
  }

  int64_t latent_dim() const { return latent_dim_; }
  int64_t layers() const { return layers_; }
  // Tokens whose latents are stored (all layers written).
  int64_t length() const { return length_; }
  void set_length(int64_t tokens) { length_ = tokens; }

  // Grows every layer to hold `tokens` rows; existing rows are kept.
  void EnsureCapacity(int64_t tokens) {
    if (tokens <= capacity_) return;
    int64_t grown = capacity_ == 0 ? 64 : capacity_;
    while (grown < tokens) grown *= 2;
    for (auto& layer : per_layer_) layer.resize(static_cast<size_t>(grown * latent_dim_));
    capacity_ = grown;
  }
  float* Row(int64_t layer, int64_t position) {
    return per_layer_[static_cast<size_t>(layer)].data() + position * latent_dim_;
  }
  const float* Layer(int64_t layer) const { return per_layer_[static_cast<size_t>(layer)].data(); }
  // Bytes a token occupies across all layers (fp32).
  int64_t bytes_per_token() const {
    return layers_ * latent_dim_ * static_cast<int64_t>(sizeof(float));
  }

 private:
  int64_t latent_dim_;
  int64_t layers_;
  int64_t length_ = 0;
  int64_t capacity_ = 0;
  std::vector<std::vector<float>> per_layer_;  // [layers][capacity * latent_dim]
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_LATENT_CACHE_H_
