#include "common/engine/engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/base/file.h"
#include "common/base/status_macros.h"
#include "common/kernels/cpu_ops.h"
#include "common/tokenizer/text_stream.h"

namespace splitmoe::engine {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const std::string& model_dir,
                                                     const EngineOptions& options) {
  std::unique_ptr<Engine> engine(new Engine());
  engine->options_ = options;
  SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  engine->config_ = ckpt->config();
  model::LoadOptions load;
  load.mtp = options.load_mtp;
  load.resident = options.weights;
  SPLITMOE_ASSIGN_OR_RETURN(engine->weights_, model::LoadWeights(*ckpt, load));
  if (options.pack_weights) {
    SPLITMOE_RETURN_IF_ERROR(PackForInference(&engine->weights_));  // and OpenBLAS one thread
  }
  SPLITMOE_ASSIGN_OR_RETURN(const bool has_tokenizer,
                            RegularFileExists(model_dir + "/tokenizer.json"));
  if (has_tokenizer) {
    SPLITMOE_ASSIGN_OR_RETURN(engine->tokenizer_, tokenizer::Tokenizer::LoadFromDir(model_dir));
    if (engine->tokenizer_->vocab_size() > engine->config_.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(model_dir, "/tokenizer.json has ", engine->tokenizer_->vocab_size(),
                       " ids but config.json's vocab_size is ", engine->config_.vocab_size));
    }
  }
  engine->moe_ = std::make_unique<LocalMoeExecutor>(engine->config_, engine->weights_);
  engine->transformer_ =
      std::make_unique<Transformer>(engine->config_, engine->weights_, engine->moe_.get());
  return engine;
}

absl::Status Engine::Prefill(absl::Span<const int32_t> tokens, LatentCache* cache,
                             std::vector<float>* hidden) {
  hidden->clear();
  std::vector<float> chunk_hidden;
  for (size_t begin = 0; begin < tokens.size(); begin += kPrefillChunkTokens) {
    const size_t end = std::min(tokens.size(), begin + static_cast<size_t>(kPrefillChunkTokens));
    std::vector<SequenceChunk> batch = {{tokens.subspan(begin, end - begin), cache}};
    SPLITMOE_RETURN_IF_ERROR(transformer_->Forward(batch, options_.prefill_form, &chunk_hidden));
    hidden->insert(hidden->end(), chunk_hidden.begin(), chunk_hidden.end());
  }
  return absl::OkStatus();
}

absl::StatusOr<ScoreResult> Engine::Score(const std::vector<int32_t>& tokens, int64_t top_logprobs,
                                          bool with_mtp) {
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  if (top_logprobs < 0) return absl::InvalidArgumentError("top_logprobs must be >= 0");
  const int64_t n = static_cast<int64_t>(tokens.size()), vocab = config_.vocab_size;
  LatentCache cache(config_.num_hidden_layers, config_.latent_dim());
  std::vector<float> hidden;
  SPLITMOE_RETURN_IF_ERROR(Prefill(tokens, &cache, &hidden));
  ScoreResult result;
  result.tokens = tokens;
  result.prompt_logprobs.resize(static_cast<size_t>(n));
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (int64_t i = 1; i < n; ++i) {
    transformer_->Logits(hidden.data() + (i - 1) * config_.hidden_size, 1, logits.data());
    result.prompt_logprobs[static_cast<size_t>(i)] =
        ComputeLogprob(logits, tokens[i], top_logprobs);
  }
  if (with_mtp) {
    if (transformer_->mtp_modules() == 0) {
      return absl::FailedPreconditionError("the model has no MTP module");
    }
    if (n >= 3) {
      LatentCache mtp_cache(1, config_.latent_dim());
      std::vector<float> mtp_logits;
      // Row i (i < n - 2) reads token i+1 and main hidden state i and predicts token i+2.
      for (int64_t begin = 0; begin < n - 2; begin += kPrefillChunkTokens) {
        const int64_t end = std::min(n - 2, begin + kPrefillChunkTokens);
        absl::Span<const int32_t> next(tokens.data() + begin + 1, static_cast<size_t>(end - begin));
        std::vector<SequenceChunk> mtp_batch = {{next, &mtp_cache}};
        SPLITMOE_RETURN_IF_ERROR(transformer_->MtpForward(
            0, mtp_batch, hidden.data() + begin * config_.hidden_size, options_.prefill_form,
            &mtp_logits));
        for (int64_t i = begin; i < end; ++i) {
          result.mtp_logprobs.push_back(ComputeLogprob(
              absl::MakeConstSpan(mtp_logits.data() + (i - begin) * vocab, static_cast<size_t>(vocab)),
              tokens[i + 2], top_logprobs));
        }
      }
    }
  }
  return result;
}

absl::Status Engine::ValidateRequest(const GenerateRequest& r) const {
  if (r.prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  for (int32_t t : r.prompt) {
    if (t < 0 || t >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", t, " outside the vocabulary [0, ", config_.vocab_size, ")"));
    }
  }
  if (r.max_tokens <= 0)
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be > 0, got ", r.max_tokens));
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
  if (total > config_.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", r.prompt.size(), " tokens) + max_tokens (", r.max_tokens,
                     ") exceeds the context of ", config_.max_position_embeddings, " tokens"));
  }
  if (r.logprobs > 20) return absl::InvalidArgumentError("logprobs must be <= 20");
  if (!r.stop.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError(
        "stop strings need a tokenizer, and the model directory has none");
  }
  for (const std::string& s : r.stop) {
    if (s.empty()) return absl::InvalidArgumentError("empty stop string");
  }
  return ValidateSamplingParams(r.sampling);
}

absl::StatusOr<GenerateResult> Engine::Generate(const GenerateRequest& request,
                                                const TokenCallback& on_token) {
  SPLITMOE_RETURN_IF_ERROR(ValidateRequest(request));
  const int64_t vocab = config_.vocab_size, hidden_size = config_.hidden_size;
  LatentCache cache(config_.num_hidden_layers, config_.latent_dim());
  std::vector<float> hidden, logits(static_cast<size_t>(vocab));
  SPLITMOE_RETURN_IF_ERROR(Prefill(request.prompt, &cache, &hidden));
  transformer_->Logits(
      hidden.data() + (static_cast<int64_t>(request.prompt.size()) - 1) * hidden_size, 1,
      logits.data());

  tokenizer::TextStream text(tokenizer_.get(), request.stop);

  GenerateResult result;
  result.finish_reason = "length";
  for (int64_t i = 0; i < request.max_tokens; ++i) {
    const int64_t position = static_cast<int64_t>(request.prompt.size()) + i;
    const int32_t token = SampleToken(logits, request.sampling, position);
    result.tokens.push_back(token);
    if (request.logprobs >= 0)
      result.logprobs.push_back(ComputeLogprob(logits, token, request.logprobs));
    bool stop = (!request.ignore_eos && token == config_.eos_token_id) ||
                std::find(request.stop_token_ids.begin(), request.stop_token_ids.end(), token) !=
                    request.stop_token_ids.end();
    const bool last = stop || i + 1 == request.max_tokens;
    bool stopped_by_string = false;
    SPLITMOE_ASSIGN_OR_RETURN(std::string piece, text.Push(token, last, &stopped_by_string));
    stop = stop || stopped_by_string;
    result.text += piece;
    if (on_token) on_token(token, piece);
    if (stop) {
      result.finish_reason = "stop";
      break;
    }
    if (last) break;
    std::vector<int32_t> next = {token};
    std::vector<SequenceChunk> step = {{next, &cache}};
    SPLITMOE_RETURN_IF_ERROR(transformer_->Forward(step, AttentionForm::kAbsorbed, &hidden));
    transformer_->Logits(hidden.data(), 1, logits.data());
  }
  return result;
}

}  // namespace splitmoe::engine
