// BatchDecoder: continuous batching. Sequences whose prompt is already in their latent cache
// join the running batch at any step and leave it when they finish or are cancelled; every
// Step() feeds each running sequence its last token, runs one forward pass over all of them
// (projections and experts batched, attention per sequence), samples each with its own
// parameters at its own position, and applies its stop conditions. Token ids only: stop
// strings are the detokenising side's business. Owned by one thread (the decode worker's batch
// actor); not thread-safe.
//
//   BatchDecoder decoder(&transformer, config.eos_token_id);
//   SPLITMOE_RETURN_IF_ERROR(decoder.Add(std::move(sequence)));   // after its prefill
//   while (decoder.running() > 0) {
//     SPLITMOE_ASSIGN_OR_RETURN(std::vector<DecodedToken> out, decoder.Step());
//     for (auto& t : out) Stream(t);
//   }
#ifndef SPLITMOE_COMMON_ENGINE_BATCH_DECODER_H_
#define SPLITMOE_COMMON_ENGINE_BATCH_DECODER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/latent_cache.h"
#include "common/engine/overlap.h"
#include "common/engine/sampler.h"
#include "common/engine/transformer.h"

namespace splitmoe::engine {

struct DecodeSequence {
  std::string id;
  int64_t prompt_tokens = 0;  // the cache holds exactly these when the sequence joins
  int32_t next_token = 0;     // sampled, not yet in the cache (the prefill's first token)
  int64_t generated = 1;      // tokens produced so far, next_token included
  SamplingParams sampling;
  int64_t max_tokens = 16;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int64_t logprobs = -1;  // < 0: none
  std::unique_ptr<SequenceCache> cache;
};

struct DecodedToken {
  std::string id;
  int32_t token = 0;
  std::optional<TokenLogprob> logprob;
  bool finished = false;
  std::string finish_reason;  // "length" | "stop" when finished
};

class BatchDecoder {
 public:
  // With `overlap`, a step of two or more sequences runs as two micro-batches in ping-pong
  // (overlap.h): one's attention while the other's experts work. It must outlive the decoder.
  BatchDecoder(Transformer* transformer, int64_t eos_token_id, PingPong* overlap = nullptr)
      : transformer_(transformer), eos_token_id_(eos_token_id), overlap_(overlap) {}

  // Joins the batch at the next Step(). InvalidArgument for a duplicate id or a sequence that is
  // already done (generated >= max_tokens) or whose cache does not hold its prompt.
  absl::Status Add(DecodeSequence sequence);
  // What Add checks of the sequence itself (not whether its id runs already).
  static absl::Status Check(const DecodeSequence& sequence);
  // Leaves the batch now (client cancelled); returns the sequence (its cache) or NotFound.
  absl::StatusOr<DecodeSequence> Remove(const std::string& id);
  // One token for every running sequence; finished ones leave the batch (their caches are
  // returned by TakeFinished()).
  absl::StatusOr<std::vector<DecodedToken>> Step();
  // Sequences that finished in earlier steps, so their caches can be released.
  std::vector<DecodeSequence> TakeFinished();

  size_t running() const { return running_.size(); }

 private:
  // Forward and Logits of `batch` into logits [batch.size(), vocab].
  absl::Status Compute(absl::Span<const SequenceChunk> batch, float* logits);

  Transformer* transformer_;
  int64_t eos_token_id_;
  PingPong* overlap_;
  std::map<std::string, DecodeSequence> running_;  // ordered: batch order is deterministic
  std::vector<DecodeSequence> finished_;
};

// After a layer of a prompt chunk: its latents for positions [first, first + count) are in the
// cache (what a prefill worker ships while the next layer computes). An error stops the prefill.
using ChunkLayerDoneFn = std::function<absl::Status(int64_t layer, int64_t first, int64_t count)>;

// Runs `prompt` into `cache` in chunks of Engine::kPrefillChunkTokens and samples the first
// generated token at position prompt.size() (what a prefill worker does before handing the
// sequence to a decoder). `on_layer_done` runs after every layer of every chunk. When
// `prompt_logprobs` is given it receives, as Engine::Score computes them, entry i = log
// p(prompt[i] | prompt[:i]) with the top `prompt_top_logprobs` alternatives (entry 0 empty).
absl::StatusOr<DecodedToken> PrefillFirstToken(
    Transformer& transformer, absl::Span<const int32_t> prompt, SequenceCache* cache,
    const SamplingParams& sampling, int64_t logprobs, AttentionForm form,
    const ChunkLayerDoneFn& on_layer_done = nullptr,
    std::vector<std::optional<TokenLogprob>>* prompt_logprobs = nullptr,
    int64_t prompt_top_logprobs = 0);

// Several prompts prefilled together (cross-request batching): every round runs the next chunk
// (at most `chunk_tokens`) of every unfinished prompt in one forward pass, so projections and
// MoE dispatches are shared; attention stays per prompt. Each item's result equals
// PrefillFirstToken's on its own. With `overlap` and two or more prompts, the prompts run as two
// groups in ping-pong (overlap.h): one group's attention while the other's experts work.
struct PrefillItem {
  absl::Span<const int32_t> prompt;
  SequenceCache* cache = nullptr;
  SamplingParams sampling;
  int64_t logprobs = -1;             // < 0: none
  int64_t prompt_top_logprobs = -1;  // < 0: no prompt logprobs
  // Results.
  absl::Status status;               // the item's own failure (a hook error, a bad prompt)
  DecodedToken first;
  std::vector<std::optional<TokenLogprob>> prompt_logprobs;
};
// After a layer of a round: item `item`'s rows [first, first + count) are in its cache. An error
// stops that item only (its status), the others go on.
using BatchLayerDoneFn =
    std::function<absl::Status(size_t item, int64_t layer, int64_t first, int64_t count)>;
// Returns an error only when a forward pass itself fails (then every unfinished item of that
// pass's group carries it; with ping-pong the other group's items keep their own outcomes).
absl::Status PrefillBatch(Transformer& transformer, std::vector<PrefillItem>& items,
                          AttentionForm form, const BatchLayerDoneFn& on_layer_done = nullptr,
                          int64_t chunk_tokens = 256, PingPong* overlap = nullptr);

// Whether a freshly sampled token ends the sequence, and why ("stop" or "length"); empty: go on.
std::string FinishReason(int32_t token, int64_t generated, int64_t max_tokens, int64_t eos_token_id,
                         bool ignore_eos, const std::vector<int32_t>& stop_token_ids);

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_BATCH_DECODER_H_
