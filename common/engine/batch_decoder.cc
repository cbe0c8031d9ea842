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

// After a round's main pass: the rows of its items with an MTP cache run through MTP module 0
// (row p reads token p + 1, so a prompt's last row waits for its first generated token), and
// each such item keeps the main hidden state of its prompt's last position. A failure fails
// those items only.
void RunMtpRound(Transformer& transformer, std::vector<PrefillItem>& items,
                 const std::vector<size_t>& round, const std::vector<SequenceChunk>& batch,
                 const std::vector<float>& hidden, const std::vector<int64_t>& base, size_t begin,
                 AttentionForm form, const BatchLayerDoneFn& on_layer_done) {
  const int64_t h = transformer.config().hidden_size;
  std::vector<size_t> mtp_items;
  std::vector<int64_t> mtp_count;
  std::vector<SequenceChunk> mtp_batch;
  std::vector<float> mtp_hidden;
  int64_t row = 0;
  for (size_t r = 0; r < round.size(); ++r) {
    PrefillItem& item = items[round[r]];
    const auto n = static_cast<int64_t>(batch[r].tokens.size());
    if (item.status.ok() && item.mtp_cache != nullptr) {
      const auto size = static_cast<int64_t>(item.prompt.size());
      const auto first = static_cast<int64_t>(begin);
      if (first + n == size) {
        item.last_hidden.assign(hidden.begin() + (row + n - 1) * h,
                                hidden.begin() + (row + n) * h);
      }
      const int64_t count = std::min(n, size - 1 - first);
      if (count > 0 && item.mtp_cache->length() != base[round[r]] + first) {
        item.status = absl::InternalError(absl::StrCat(
            "the MTP cache holds ", item.mtp_cache->length(), " rows, expected ",
            base[round[r]] + first));
      } else if (count > 0) {
        mtp_items.push_back(round[r]);
        mtp_count.push_back(count);
        mtp_batch.push_back({item.prompt.subspan(begin + 1, static_cast<size_t>(count)),
                             item.mtp_cache});
        mtp_hidden.insert(mtp_hidden.end(), hidden.begin() + row * h,
                          hidden.begin() + (row + count) * h);
      }
    }
    row += n;
  }
  if (mtp_batch.empty()) return;
  absl::Status status =
      transformer.MtpForward(0, mtp_batch, mtp_hidden.data(), form, /*mtp_logits=*/nullptr);
  for (size_t m = 0; m < mtp_items.size(); ++m) {
    PrefillItem& item = items[mtp_items[m]];
    if (!status.ok()) {
      item.status = Annotate(status, "MTP module");
    } else if (on_layer_done) {
      item.status = on_layer_done(mtp_items[m], transformer.config().num_hidden_layers,
                                  static_cast<int64_t>(begin), mtp_count[m]);
    }
  }
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
  RunMtpRound(transformer, items, round, batch, hidden, base, begin, form, on_layer_done);
  std::vector<float> logits(static_cast<size_t>(transformer.config().vocab_size));
  int64_t row = 0;
  for (size_t r = 0; r < round.size(); ++r) {
    PrefillItem& item = items[round[r]];
    const size_t n = batch[r].tokens.size();
    if (item.status.ok() && item.prompt_top_logprobs >= 0) {
      // Row j (position begin + j) predicts the token at begin + j + 1.
      for (size_t j = 0; j < n && begin + j + 1 < item.prompt.size(); ++j) {
        item.status = transformer.Logits(hidden.data() + (row + static_cast<int64_t>(j)) * h, 1,
                                         logits.data());
        if (!item.status.ok()) break;
        item.prompt_logprobs[begin + j + 1] =
            ComputeLogprob(logits, item.prompt[begin + j + 1], item.prompt_top_logprobs);
      }
    }
    if (item.status.ok() && begin + n == item.prompt.size()) {
      item.status = transformer.Logits(hidden.data() + (row + static_cast<int64_t>(n) - 1) * h,
                                       1, logits.data());
    }
    if (item.status.ok() && begin + n == item.prompt.size()) {
      // The position after the prompt in the sequence (a cached prefix comes before it).
      item.first.token = SampleToken(logits, item.sampling,
                                     base[round[r]] + static_cast<int64_t>(item.prompt.size()));
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
  bool pipelined = true;
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
    if (item.mtp_cache != nullptr) {
      if (transformer.mtp_modules() == 0) {
        item.status = absl::FailedPreconditionError("speculative decoding: the model has no MTP module");
        continue;
      }
      if (item.mtp_cache->length() != base[i]) {
        item.status = absl::InvalidArgumentError(absl::StrCat(
            "the MTP cache holds ", item.mtp_cache->length(), " rows, the cache ", base[i]));
        continue;
      }
      pipelined = false;  // a round's MTP rows need the round before them
    }
    // All of the prompt's room now: no cache grows (and moves its rows) while another round's
    // latents are in flight from it.
    item.status = item.cache->Reserve(base[i] + static_cast<int64_t>(item.prompt.size()));
    rounds = std::max(rounds, (static_cast<int64_t>(item.prompt.size()) + chunk_tokens - 1) /
                                  chunk_tokens);
  }
  if (overlap == nullptr || rounds < 2 || !pipelined) {
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
  if (s.mtp_cache != nullptr &&
      static_cast<int64_t>(s.mtp_hidden.size()) !=
          static_cast<int64_t>(s.mtp_tokens.size()) * transformer_->config().hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", s.id, ": ", s.mtp_hidden.size(), " hidden values for ", s.mtp_tokens.size(),
        " waiting MTP rows of ", transformer_->config().hidden_size));
  }
  if (s.mtp_cache != nullptr && transformer_->mtp_modules() == 0) {
    return absl::FailedPreconditionError("speculative decoding: the model has no MTP module");
  }
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
  if (s.mtp_cache != nullptr) {
    const auto waiting = static_cast<int64_t>(s.mtp_tokens.size());
    if (waiting == 0 || s.mtp_tokens.back() != s.next_token ||
        s.mtp_cache->length() + waiting != s.cache->length() || s.mtp_hidden.empty() ||
        s.mtp_hidden.size() % static_cast<size_t>(waiting) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", s.id, ": its MTP cache (", s.mtp_cache->length(), " rows, ", waiting,
          " waiting) does not follow its cache of ", s.cache->length()));
    }
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

absl::Status BatchDecoder::Compute(absl::Span<const SequenceChunk> batch, float* hidden,
                                   float* logits) {
  std::vector<float> h;
  SPLITMOE_RETURN_IF_ERROR(transformer_->Forward(batch, AttentionForm::kAbsorbed, &h));
  std::copy(h.begin(), h.end(), hidden);
  return transformer_->Logits(
      h.data(), static_cast<int64_t>(h.size()) / transformer_->config().hidden_size, logits);
}

int64_t BatchDecoder::DraftBudget(const DecodeSequence& s) const {
  if (draft_tokens_ <= 0 || s.mtp_cache == nullptr) return 0;
  return std::max<int64_t>(
      0, std::min({draft_tokens_, s.max_tokens - s.generated - 1,
                   transformer_->config().max_position_embeddings - 1 - s.cache->length()}));
}

std::vector<std::pair<std::string, int64_t>> BatchDecoder::NextStepTokens() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (const auto& [id, s] : running_) {
    out.emplace_back(id, s.cache->length() + 1 + DraftBudget(s));
  }
  return out;
}

absl::Status BatchDecoder::Draft(const std::vector<int64_t>& budget,
                                 std::vector<std::vector<int32_t>>* drafts) {
  const int64_t hidden = transformer_->config().hidden_size;
  const int64_t vocab = transformer_->config().vocab_size;
  const SamplingParams greedy;
  std::vector<DecodeSequence*> seqs;
  for (auto& [id, s] : running_) seqs.push_back(&s);
  // The module's own hidden state at each drafting sequence's last drafted position.
  std::vector<std::vector<float>> chained(seqs.size());
  const int64_t rounds = budget.empty() ? 0 : *std::max_element(budget.begin(), budget.end());
  for (int64_t round = 0; round < rounds; ++round) {
    std::vector<size_t> who;
    std::vector<SequenceChunk> batch;
    std::vector<float> main_hidden;
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (budget[i] <= round) continue;
      DecodeSequence& s = *seqs[i];
      who.push_back(i);
      if (round == 0) {
        // The rows the module has not seen, the last of them next_token's.
        batch.push_back({s.mtp_tokens, s.mtp_cache.get()});
        main_hidden.insert(main_hidden.end(), s.mtp_hidden.begin(), s.mtp_hidden.end());
      } else {
        batch.push_back({absl::MakeConstSpan(&(*drafts)[i].back(), 1), s.mtp_cache.get()});
        main_hidden.insert(main_hidden.end(), chained[i].begin(), chained[i].end());
      }
    }
    std::vector<float> logits, block_hidden;
    SPLITMOE_RETURN_IF_ERROR(Annotate(
        transformer_->MtpForward(0, batch, main_hidden.data(), AttentionForm::kAbsorbed, &logits,
                                 &block_hidden),
        "drafting with the MTP module"));
    int64_t row = -1;
    for (size_t w = 0; w < who.size(); ++w) {
      row += static_cast<int64_t>(batch[w].tokens.size());  // each sequence's last row
      const size_t i = who[w];
      (*drafts)[i].push_back(SampleToken(
          absl::MakeConstSpan(logits.data() + row * vocab, static_cast<size_t>(vocab)), greedy, 0));
      chained[i].assign(block_hidden.begin() + row * hidden, block_hidden.begin() + (row + 1) * hidden);
      if (round == 0) {
        seqs[i]->mtp_tokens.clear();
        seqs[i]->mtp_hidden.clear();
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<DecodedToken>> BatchDecoder::Step() {
  std::vector<DecodedToken> out;
  if (running_.empty()) return out;
  const model::ModelConfig& c = transformer_->config();
  const int64_t vocab = c.vocab_size, hidden_size = c.hidden_size;
  const size_t n = running_.size();
  // Drafts per sequence: K, less than what it may still emit, within the context.
  std::vector<int64_t> budget(n, 0), mtp_keep(n, 0), length(n, 0);
  size_t i = 0;
  for (auto& [id, s] : running_) {
    length[i] = s.cache->length();
    if (draft_tokens_ > 0 && s.mtp_cache != nullptr) {
      budget[i] = DraftBudget(s);
      // What the module's cache keeps after this step: every row up to next_token's.
      mtp_keep[i] = s.mtp_cache->length() + static_cast<int64_t>(s.mtp_tokens.size());
    }
    ++i;
  }
  std::vector<std::vector<int32_t>> drafts(n);
  SPLITMOE_RETURN_IF_ERROR(Draft(budget, &drafts));
  std::vector<std::vector<int32_t>> inputs(n);
  std::vector<SequenceChunk> batch;
  std::vector<int64_t> first_row(n + 1, 0);
  i = 0;
  for (auto& [id, s] : running_) {
    inputs[i].push_back(s.next_token);
    inputs[i].insert(inputs[i].end(), drafts[i].begin(), drafts[i].end());
    batch.push_back({inputs[i], s.cache.get()});
    first_row[i + 1] = first_row[i] + static_cast<int64_t>(inputs[i].size());
    ++i;
  }
  const int64_t rows = first_row[n];
  std::vector<float> hidden(static_cast<size_t>(rows * hidden_size));
  std::vector<float> logits(static_cast<size_t>(rows * vocab));
  if (overlap_ != nullptr && batch.size() >= 2) {
    // Two micro-batches in ping-pong; each sequence's numbers do not depend on the split.
    const size_t half = batch.size() / 2;
    const int64_t split = first_row[half];
    const absl::Span<const SequenceChunk> all(batch);
    absl::Status a, b;
    overlap_->Run(
        [&] { a = Compute(all.subspan(0, half), hidden.data(), logits.data()); },
        [&] {
          b = Compute(all.subspan(half), hidden.data() + split * hidden_size,
                      logits.data() + split * vocab);
        });
    SPLITMOE_RETURN_IF_ERROR(a);
    SPLITMOE_RETURN_IF_ERROR(b);
  } else {
    SPLITMOE_RETURN_IF_ERROR(Compute(batch, hidden.data(), logits.data()));
  }
  i = 0;
  for (auto it = running_.begin(); it != running_.end(); ++i) {
    DecodeSequence& s = it->second;
    // Position by position: the token one-token decoding samples there; the draft stands while
    // it equals that token.
    int64_t emitted = 0;
    bool finished = false;
    for (size_t j = 0; j < inputs[i].size() && !finished; ++j) {
      const int64_t row = first_row[i] + static_cast<int64_t>(j);
      absl::Span<const float> l(logits.data() + row * vocab, static_cast<size_t>(vocab));
      const int64_t position = s.prompt_tokens + s.generated;
      const int32_t token = SampleToken(l, s.sampling, position);
      ++s.generated;
      ++emitted;
      DecodedToken t;
      t.id = s.id;
      t.token = token;
      if (s.logprobs >= 0) t.logprob = ComputeLogprob(l, token, s.logprobs);
      t.finish_reason = FinishReason(token, s.generated, s.max_tokens, eos_token_id_,
                                     s.ignore_eos, s.stop_token_ids);
      t.finished = finished = !t.finish_reason.empty();
      s.next_token = token;
      if (s.mtp_cache != nullptr) {
        s.mtp_tokens.push_back(token);
        s.mtp_hidden.insert(s.mtp_hidden.end(), hidden.begin() + row * hidden_size,
                            hidden.begin() + (row + 1) * hidden_size);
      }
      out.push_back(std::move(t));
      const bool accepted = j < drafts[i].size() && token == drafts[i][j];
      if (accepted) ++stats_.accepted;
      if (!accepted) break;
    }
    // The rows of rejected drafts go; the module keeps only rows the main model confirmed.
    s.cache->Truncate(length[i] + emitted);
    if (s.mtp_cache != nullptr && budget[i] > 0) s.mtp_cache->Truncate(mtp_keep[i]);
    if (budget[i] > 0) {
      stats_.drafted += budget[i];
      ++stats_.verify_passes;
      stats_.emitted += emitted;
    }
    if (finished) {
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
