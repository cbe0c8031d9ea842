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
#include <utility>
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
  // Speculative decoding (BatchDecoder's draft_tokens > 0): MTP module 0's cache, or null to
  // decode this sequence one token a step. The module's row at position p reads token p+1 and
  // the main model's final-normed hidden state at p; rows it has not consumed yet wait in
  // `mtp_tokens` / `mtp_hidden` ([mtp_tokens.size(), hidden]), so that
  // mtp_cache->length() + mtp_tokens.size() == cache->length() and the last of `mtp_tokens` is
  // `next_token`. After a prefill: the prompt's rows but the last in the module's cache
  // (PrefillItem::mtp_cache), and {first token} / {the prompt's last hidden state} waiting.
  std::unique_ptr<SequenceCache> mtp_cache;
  std::vector<int32_t> mtp_tokens;
  std::vector<float> mtp_hidden;
};

// What speculative decoding did: draft tokens proposed and accepted, verification passes, and
// tokens emitted by them (accepted drafts plus one token of the main model per pass).
struct SpeculativeStats {
  int64_t drafted = 0;
  int64_t accepted = 0;
  int64_t verify_passes = 0;
  int64_t emitted = 0;
  double acceptance_rate() const {
    return drafted == 0 ? 0.0 : static_cast<double>(accepted) / static_cast<double>(drafted);
  }
  // Tokens per verification pass of a sequence (1.0: no gain).
  double tokens_per_pass() const {
    return verify_passes == 0 ? 0.0
                              : static_cast<double>(emitted) / static_cast<double>(verify_passes);
  }
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
  //
  // With `draft_tokens` K > 0 (speculative decoding with the model's MTP module), a step drafts
  // up to K tokens per sequence that has an MTP cache — the module run K times, chained on its
  // own hidden state, each draft its argmax — then verifies them in ONE forward pass of the main
  // model over the K + 1 positions [next_token, d1..dK]. Position by position the main model's
  // token is sampled exactly as one-token decoding samples it (same logits, same
  // CounterUniform(seed, position)); the draft is accepted while it equals that token, and the
  // first token that differs (or the one after the last draft) is emitted too. This is the
  // standard rejection rule for a deterministic draft (accept d with probability
  // min(1, p(d) / q(d)) = p(d), else sample from p without d) realised with the sampler's own
  // uniform, so greedy AND seeded outputs are the tokens one-token decoding produces. The main
  // and MTP caches are rolled back past the first rejection.
  BatchDecoder(Transformer* transformer, int64_t eos_token_id, PingPong* overlap = nullptr,
               int64_t draft_tokens = 0)
      : transformer_(transformer),
        eos_token_id_(eos_token_id),
        overlap_(overlap),
        draft_tokens_(draft_tokens) {}

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
  int64_t draft_tokens() const { return draft_tokens_; }
  // For every running sequence, the tokens its cache must hold for the next Step(): its length,
  // next_token's row and its drafts. A cache that grows on demand (the decode worker's) is
  // given that room before the step, so no step fails for want of a block.
  std::vector<std::pair<std::string, int64_t>> NextStepTokens() const;
  const SpeculativeStats& speculative_stats() const { return stats_; }

 private:
  // Forward and Logits of `batch` into hidden [rows, hidden] and logits [rows, vocab].
  absl::Status Compute(absl::Span<const SequenceChunk> batch, float* hidden, float* logits);
  // Drafts the next step gives `s`: K, less than it may still emit, within the context.
  int64_t DraftBudget(const DecodeSequence& s) const;
  // Drafts for every sequence with a positive entry in `budget` (aligned with running_):
  // drafts[i] gets budget[i] tokens. Consumes the sequences' waiting MTP rows.
  absl::Status Draft(const std::vector<int64_t>& budget, std::vector<std::vector<int32_t>>* drafts);

  Transformer* transformer_;
  int64_t eos_token_id_;
  PingPong* overlap_;
  int64_t draft_tokens_;
  SpeculativeStats stats_;
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
  // MTP module 0's cache (speculative decoding), as long as `cache` before the prompt, or null.
  // The prompt's rows but the last are run through the module into it (row p reads token p+1
  // and the main model's hidden state at p), after each round's main pass; `on_layer_done`
  // hears of them as layer num_hidden_layers. Such a prompt's rounds are not pipelined.
  SequenceCache* mtp_cache = nullptr;
  // Results.
  absl::Status status;               // the item's own failure (a hook error, a bad prompt)
  DecodedToken first;
  std::vector<std::optional<TokenLogprob>> prompt_logprobs;
  std::vector<float> last_hidden;  // with mtp_cache: the main hidden state at the last position
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
