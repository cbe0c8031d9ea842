#include "common/engine/batch_decoder.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

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
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  constexpr size_t kChunk = 256;  // as Engine::kPrefillChunkTokens
  const int64_t h = transformer.config().hidden_size;
  std::vector<float> hidden;
  std::vector<float> logits(static_cast<size_t>(transformer.config().vocab_size));
  if (prompt_logprobs != nullptr) {
    prompt_logprobs->assign(prompt.size(), std::nullopt);
  }
  for (size_t begin = 0; begin < prompt.size(); begin += kChunk) {
    const size_t end = std::min(prompt.size(), begin + kChunk);
    std::vector<SequenceChunk> batch = {{prompt.subspan(begin, end - begin), cache}};
    Transformer::LayerDoneFn hook;
    if (on_layer_done) {
      hook = [&](int64_t layer) {
        return on_layer_done(layer, static_cast<int64_t>(begin),
                             static_cast<int64_t>(end - begin));
      };
    }
    SPLITMOE_RETURN_IF_ERROR(transformer.Forward(batch, form, &hidden, hook));
    if (prompt_logprobs != nullptr) {
      // Row r (position begin + r) predicts the token at begin + r + 1.
      for (size_t r = 0; r < end - begin && begin + r + 1 < prompt.size(); ++r) {
        transformer.Logits(hidden.data() + static_cast<int64_t>(r) * h, 1, logits.data());
        (*prompt_logprobs)[begin + r + 1] =
            ComputeLogprob(logits, prompt[begin + r + 1], prompt_top_logprobs);
      }
    }
  }
  const int64_t last_row = static_cast<int64_t>(hidden.size()) / h - 1;
  transformer.Logits(hidden.data() + last_row * h, 1, logits.data());
  DecodedToken t;
  t.token = SampleToken(logits, sampling, static_cast<int64_t>(prompt.size()));
  if (logprobs >= 0) t.logprob = ComputeLogprob(logits, t.token, logprobs);
  return t;
}

absl::Status BatchDecoder::Add(DecodeSequence s) {
  if (running_.count(s.id))
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.id, " already running"));
  if (s.cache == nullptr || s.cache->length() != s.prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", s.id, ": its cache does not hold its ", s.prompt_tokens, " prompt tokens"));
  }
  if (s.generated >= s.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.id, " is already complete"));
  }
  running_.emplace(s.id, std::move(s));
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
  std::vector<float> hidden, logits(static_cast<size_t>(running_.size()) * vocab);
  SPLITMOE_RETURN_IF_ERROR(transformer_->Forward(batch, AttentionForm::kAbsorbed, &hidden));
  transformer_->Logits(hidden.data(), static_cast<int64_t>(running_.size()), logits.data());
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
