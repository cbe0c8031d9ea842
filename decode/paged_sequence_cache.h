// PagedSequenceCache: one sequence's view of the decode worker's PagedLatentCache, as the
// engine::SequenceCache the Transformer reads and writes. New tokens' rows are written straight
// into the arena (fp32) or staged in fp32 and stored, rounded, once the layer's rows are written
// (RowsWritten; bf16), so attention reads them as the cache holds them. View hands the
// attention the sequence's blocks in place; LayerRows (the naive form of prefill) gathers one
// layer's rows into a scratch buffer. Owned with the cache by the decode
// worker's actor; not thread-safe.
//
//   SPLITMOE_ASSIGN_OR_RETURN(Reservation r, cache.Reserve(prompt.size(), max_tokens));
//   PagedSequenceCache view(&cache, r.id, /*stored_tokens=*/0);   // prefill fills it
//   std::vector<engine::SequenceChunk> batch = {{prompt, &view}};
#ifndef SPLITMOE_DECODE_PAGED_SEQUENCE_CACHE_H_
#define SPLITMOE_DECODE_PAGED_SEQUENCE_CACHE_H_

#include <map>
#include <utility>
#include <vector>

#include "common/engine/latent_cache.h"
#include "decode/paged_latent_cache.h"

namespace splitmoe::decode {

class PagedSequenceCache : public engine::SequenceCache {
 public:
  // `stored_tokens`: rows already written for every layer (e.g. by a prefill worker's puts).
  // `layer_offset`: layer l of this view is layer l + layer_offset of the blocks — the MTP
  // module's view of a sequence (its one layer after the main layers, with a length of its own)
  // shares the sequence's blocks with the main layers' view.
  PagedSequenceCache(PagedLatentCache* cache, SequenceId id, int64_t stored_tokens,
                     int64_t layer_offset = 0)
      : cache_(cache), id_(id), length_(stored_tokens), layer_offset_(layer_offset) {}

  int64_t latent_dim() const override { return cache_->layout().latent_dim; }
  int64_t length() const override { return length_; }
  absl::Status Reserve(int64_t tokens) override;
  float* Row(int64_t layer, int64_t position) override;
  void RowsWritten(int64_t layer) override;
  kernels::LatentBlocks View(int64_t layer, int64_t keys) override;
  const float* LayerRows(int64_t layer, int64_t keys) override;
  // Stored rows and those staged since (bf16: Row() would stage a new, empty one).
  absl::Status ReadRows(int64_t layer, int64_t first, int64_t n, float* out) override;
  void Commit(int64_t new_length) override;
  void Truncate(int64_t length) override;

  SequenceId id() const { return id_; }

 protected:
  bool bf16() const { return cache_->layout().dtype == LatentDType::kBFloat16; }
  // Rows [0, keys) of `layer` as the host arena holds them (and those staged), gathered into
  // one fp32 array, valid until the next call.
  const float* HostRows(int64_t layer, int64_t keys);

  PagedLatentCache* cache_;
  SequenceId id_;
  int64_t length_;
  int64_t layer_offset_;

 private:
  std::vector<float> scratch_;                                        // gathered rows of one layer
  std::map<std::pair<int64_t, int64_t>, std::vector<float>> staged_;  // bf16: (layer, pos) -> row
};

}  // namespace splitmoe::decode

#endif  // SPLITMOE_DECODE_PAGED_SEQUENCE_CACHE_H_
