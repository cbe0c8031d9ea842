#include "common/engine/batch_decoder.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/engine/request_check.h"

namespace splitmoe::engine {

std::string FinishReason(int32_t token, int64_t generated, int64_t max_tokens, int64_t eos_token_id,
                         bool ignore_eos, const std::vector<int32_t>& stop_token_ids) {
  if (!ignore_eos && token == eos_token_id) return "stop";
  if (std::find(stop_token_ids.begin(), stop_token_ids.end(), token) != stop_token_ids.end()) {
    return "stop";
  }
  if (generated >= max_tokens) return "length";
  return "";
}

absl::StatusOr<DecodedToken> PrefillFirstToken(
    Transformer& transformer, absl::Span<const int32_t> prompt, SequenceCache* cache,
    const SamplingParams& sampling, int64_t logprobs, AttentionForm form,
    const ChunkLayerDoneFn& on_layer_done,
    std::vector<std::optional<TokenLogprob>>* prompt_logprobs, int64_t prompt_top_logprobs) {
  std::vector<PrefillItem> items(1);
  items[0].prompt = prompt;
  items[0].cache = cache;
  items[0].sampling = sampling;
  items[0].logprobs = logprobs;
  items[0].prompt_top_logprobs = prompt_logprobs != nullptr ? prompt_top_logprobs : -1;
  BatchLayerDoneFn hook;
  if (on_layer_done) {
    hook = [&](size_t, int64_t layer, int64_t first, int64_t count) {
      return on_layer_done(layer, first, count);
    };
  }
  SPLITMOE_RETURN_IF_ERROR(PrefillBatch(transformer, items, form, hook));
  SPLITMOE_RETURN_IF_ERROR(items[0].status);
  if (prompt_logprobs != nullptr) *prompt_logprobs = std::move(items[0].prompt_logprobs);
  return std::move(items[0].first);
}

namespace {

// A prompt's own faults fail that prompt alone, before any forward pass (Transformer::Forward
// refuses a whole round for one bad id or one sequence past the context): an id outside the
// vocabulary, or more tokens than the context holds after the `cached` ones.
absl::Status CheckPrompt(const model::ModelConfig& c, absl::Span<const int32_t> prompt,
                         int64_t cached) {
  SPLITMOE_RETURN_IF_ERROR(CheckTokenIds(c, prompt, "token id"));
  const int64_t end = cached + static_cast<int64_t>(prompt.size());
  if (end > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("sequence of ", end,
                                                   " tokens exceeds the context of ",
                                                   c.max_position_embeddings, " tokens"));
  }
  return absl::OkStatus();
}

// Round k of a group runs chunk k (tokens [k * chunk_tokens, ...)) of every prompt that long,
// at position base + k * chunk_tokens of its cache. Returns the forward pass's error when it is
// not the items' own (those stay in their statuses); items already failed are left out.
absl::Status RunRound(Transformer& transformer, std::vector<PrefillItem>& items,
                      const std::vector<int64_t>& base, int64_t k, int64_t chunk_tokens,
                      AttentionForm form, const BatchLayerDoneFn& on_layer_done,
                      const LayerOrder* order) {
  const int64_t h = transformer.config().hidden_size;
  std::vector<size_t> round;
  std::vector<SequenceChunk> batch;
  const auto begin = static_cast<size_t>(k * chunk_tokens);
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].status.ok() || begin >= items[i].prompt.size()) continue;
    const size_t n = std::min(items[i].prompt.size() - begin, static_cast<size_t>(chunk_tokens));
    round.push_back(i);
    batch.push_back({items[i].prompt.subspan(begin, n), items[i].cache,
                     base[i] + static_cast<int64_t>(begin)});
  }
  if (round.empty()) return absl::OkStatus();
  Transformer::LayerDoneFn hook;
  if (on_layer_done) {
    hook = [&](int64_t layer) -> absl::Status {
      bool any = false;
      for (size_t r = 0; r < round.size(); ++r) {
        PrefillItem& item = items[round[r]];
        if (!item.status.ok()) continue;
        item.status = on_layer_done(round[r], layer, static_cast<int64_t>(begin),
                                    static_cast<int64_t>(batch[r].tokens.size()));
        any = any || item.status.ok();
      }
      // Nobody left in this round: stop the pass (its caches are abandoned with the items).
      return any ? absl::OkStatus() : absl::CancelledError("every prompt of the round stopped");
    };
  }
  std::vector<float> hidden;
  absl::Status forward = transformer.Forward(batch, form, &hidden, hook, order);
  if (!forward.ok()) {
    bool stopped_by_items = true;
    for (size_t i : round) stopped_by_items = stopped_by_items && !items[i].status.ok();
    if (stopped_by_items) return absl::OkStatus();  // their own statuses say why
    for (size_t i : round) {
      if (items[i].status.ok()) items[i].status = forward;
    }
    return forward;
  }
  std::vector<float> logits(static_cast<size_t>(transformer.config().vocab_size));
  int64_t row = 0;
  for (size_t r = 0; r < round.size(); ++r) {
    PrefillItem& item = items[round[r]];
    const size_t n = batch[r].tokens.size();
    if (item.status.ok() && item.prompt_top_logprobs >= 0) {
      // Row j (position begin + j) predicts the token at begin + j + 1.
      for (size_t j = 0; j < n && begin + j + 1 < item.prompt.size(); ++j) {
        transformer.Logits(hidden.data() + (row + static_cast<int64_t>(j)) * h, 1, logits.data());
        item.prompt_logprobs[begin + j + 1] =
            ComputeLogprob(logits, item.prompt[begin + j + 1], item.prompt_top_logprobs);
      }
    }
    if (item.status.ok() && begin + n == item.prompt.size()) {
      transformer.Logits(hidden.data() + (row + static_cast<int64_t>(n) - 1) * h, 1,
                         logits.data());
      item.first.token =
          SampleToken(logits, item.sampling, static_cast<int64_t>(item.prompt.size()));
      if (item.logprobs >= 0) item.first.logprob = ComputeLogprob(logits, item.first.token, item.logprobs);
    }
    row += static_cast<int64_t>(n);
  }
  return absl::OkStatus();
}

// PrefillBatch of one group of prompts: its rounds one after the other, or — with `overlap`
// and two rounds or more — pipelined as a wavefront (overlap.h, ChunkWavefront): even rounds on
// one pass, odd rounds on the other, so a chunk's MoE round trip overlaps the next chunk's
// attention.
absl::Status PrefillGroup(Transformer& transformer, std::vector<PrefillItem>& items,
                          AttentionForm form, const BatchLayerDoneFn& on_layer_done,
                          int64_t chunk_tokens, PingPong* overlap) {
  int64_t rounds = 0;
  std::vector<int64_t> base(items.size(), 0);  // each cache's length before the prompt
  for (size_t i = 0; i < items.size(); ++i) {
    PrefillItem& item = items[i];
    if (item.prompt.empty()) item.status = absl::InvalidArgumentError("empty prompt");
    if (item.status.ok()) {
      item.status = CheckPrompt(transformer.config(), item.prompt, item.cache->length());
    }
    if (item.prompt_top_logprobs >= 0) item.prompt_logprobs.assign(item.prompt.size(), std::nullopt);
    if (!item.status.ok()) continue;
    base[i] = item.cache->length();
    // All of the prompt's room now: no cache grows (and moves its rows) while another round's
    // latents are in flight from it.
    item.status = item.cache->Reserve(base[i] + static_cast<int64_t>(item.prompt.size()));
    rounds = std::max(rounds, (static_cast<int64_t>(item.prompt.size()) + chunk_tokens - 1) /
                                  chunk_tokens);
  }
  if (overlap == nullptr || rounds < 2) {
    for (int64_t k = 0; k < rounds; ++k) {
      SPLITMOE_RETURN_IF_ERROR(
          RunRound(transformer, items, base, k, chunk_tokens, form, on_layer_done, nullptr));
    }
    return absl::OkStatus();
  }
  ChunkWavefront wave(rounds);
  absl::Status status[2];
  auto pass = [&](int parity) {
    for (int64_t k = parity; k < rounds; k += 2) {
      LayerOrder order{[&, k](int64_t layer) { return wave.AwaitLayer(k, layer); },
                       [&, k](int64_t layer) { wave.LayerWritten(k, layer); }};
      absl::Status s =
          RunRound(transformer, items, base, k, chunk_tokens, form, on_layer_done, &order);
      wave.RoundEnded(k);  // always: the next round may be waiting for it
      if (status[parity].ok()) status[parity] = s;
    }
  };
  overlap->Run([&] { pass(0); }, [&] { pass(1); });
  return status[0].ok() ? status[1] : status[0];
}

}  // namespace

absl::Status PrefillBatch(Transformer& transformer, std::vector<PrefillItem>& items,
                          AttentionForm form, const BatchLayerDoneFn& on_layer_done,
                          int64_t chunk_tokens, PingPong* overlap) {
  if (overlap == nullptr || items.size() < 2) {
    return PrefillGroup(transformer, items, form, on_layer_done, chunk_tokens, overlap);
  }
  // Two groups of near-equal prompt tokens (longest first, each to the lighter group), run in
  // ping-pong; each item's result is what it would be alone.
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return items[a].prompt.size() > items[b].prompt.size();
  });
  std::vector<size_t> index[2];
  size_t tokens[2] = {0, 0};
  for (size_t i : order) {
    const int g = tokens[1] < tokens[0] ? 1 : 0;
    index[g].push_back(i);
    tokens[g] += items[i].prompt.size();
  }
  std::vector<PrefillItem> group[2];
  for (int g = 0; g < 2; ++g) {
    std::sort(index[g].begin(), index[g].end());  // batch order within a group, as given
    for (size_t i : index[g]) group[g].push_back(std::move(items[i]));
  }
  absl::Status status[2];
  auto run = [&](int g) {
    BatchLayerDoneFn hook;
    if (on_layer_done) {
      hook = [&, g](size_t item, int64_t layer, int64_t first, int64_t count) {
        return on_layer_done(index[g][item], layer, first, count);
      };
    }
    status[g] = PrefillGroup(transformer, group[g], form, hook, chunk_tokens, nullptr);
  };
  overlap->Run([&] { run(0); }, [&] { run(1); });
  for (int g = 0; g < 2; ++g) {
    for (size_t k = 0; k < index[g].size(); ++k) items[index[g][k]] = std::move(group[g][k]);
  }
  if (!status[0].ok()) return status[0];
  return status[1];
}

absl::Status BatchDecoder::Add(DecodeSequence s) {
  if (running_.count(s.id))
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.id, " already running"));
  SPLITMOE_RETURN_IF_ERROR(Check(s));
  running_.emplace(s.id, std::move(s));
  return absl::OkStatus();
}

absl::Status BatchDecoder::Check(const DecodeSequence& s) {
  if (s.cache == nullptr || s.cache->length() != s.prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", s.id, ": its cache does not hold its ", s.prompt_tokens, " prompt tokens"));
  }
  if (s.generated >= s.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.id, " is already complete"));
  }
  return absl::OkStatus();
}

absl::StatusOr<DecodeSequence> BatchDecoder::Remove(const std::string& id) {
  auto it = running_.find(id);
  if (it == running_.end())
    return absl::NotFoundError(absl::StrCat("sequence ", id, " is not running"));
  DecodeSequence s = std::move(it->second);
  running_.erase(it);
  return s;
}

absl::Status BatchDecoder::Compute(absl::Span<const SequenceChunk> batch, float* logits) {
  std::vector<float> hidden;
  SPLITMOE_RETURN_IF_ERROR(transformer_->Forward(batch, AttentionForm::kAbsorbed, &hidden));
  transformer_->Logits(hidden.data(), static_cast<int64_t>(batch.size()), logits);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<DecodedToken>> BatchDecoder::Step() {
  std::vector<DecodedToken> out;
  if (running_.empty()) return out;
  const int64_t vocab = transformer_->config().vocab_size;
  std::vector<std::vector<int32_t>> inputs;
  std::vector<SequenceChunk> batch;
  inputs.reserve(running_.size());
  for (auto& [id, s] : running_) {
    inputs.push_back({s.next_token});
    batch.push_back({inputs.back(), s.cache.get()});
  }
  std::vector<float> logits(static_cast<size_t>(running_.size()) * vocab);
  if (overlap_ != nullptr && batch.size() >= 2) {
    // Two micro-batches in ping-pong; each sequence's numbers do not depend on the split.
    const size_t half = batch.size() / 2;
    const absl::Span<const SequenceChunk> all(batch);
    absl::Status a, b;
    overlap_->Run([&] { a = Compute(all.subspan(0, half), logits.data()); },
                  [&] { b = Compute(all.subspan(half), logits.data() + half * vocab); });
    SPLITMOE_RETURN_IF_ERROR(a);
    SPLITMOE_RETURN_IF_ERROR(b);
  } else {
    SPLITMOE_RETURN_IF_ERROR(Compute(batch, logits.data()));
  }
  size_t row = 0;
  for (auto it = running_.begin(); it != running_.end(); ++row) {
    DecodeSequence& s = it->second;
    absl::Span<const float> l(logits.data() + row * vocab, static_cast<size_t>(vocab));
    const int64_t position = s.prompt_tokens + s.generated;
    const int32_t token = SampleToken(l, s.sampling, position);
    ++s.generated;
    DecodedToken t;
    t.id = s.id;
    t.token = token;
    if (s.logprobs >= 0) t.logprob = ComputeLogprob(l, token, s.logprobs);
    t.finish_reason = FinishReason(token, s.generated, s.max_tokens, eos_token_id_, s.ignore_eos,
                                   s.stop_token_ids);
    t.finished = !t.finish_reason.empty();
    s.next_token = token;
    out.push_back(std::move(t));
    if (out.back().finished) {
      finished_.push_back(std::move(s));
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

std::vector<DecodeSequence> BatchDecoder::TakeFinished() {
  std::vector<DecodeSequence> done = std::move(finished_);
  finished_.clear();
  return done;
}

}  // namespace splitmoe::engine
