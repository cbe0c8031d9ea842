#include "common/engine/engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/base/file.h"
#include "common/base/log.h"
#include "common/base/status_macros.h"
#include "common/engine/batch_decoder.h"
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
  SPLITMOE_ASSIGN_OR_RETURN(const kernels::Device device, kernels::ParseDevice(options.device));
  if (device.backend != kernels::Backend::kCpu) {
    // The device holds the values; the host's stay as loaded (mapped from the checkpoint in its
    // dtype) and give the shapes.
    OnDeviceOptions on;
    on.weights = options.device_weights;
    on.cache_tokens = options.device_cache_tokens;
    SPLITMOE_ASSIGN_OR_RETURN(engine->on_device_,
                              OnDevice::Open(device, engine->config_, engine->weights_, on));
  } else if (options.pack_weights) {
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
  if (options.draft_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("draft tokens must be >= 0, got ", options.draft_tokens));
  }
  if (options.draft_tokens > 0 && engine->weights_.mtp.empty()) {
    // The same tokens either way: decode one token a step, and say so.
    SPLITMOE_LOG(WARNING, "engine").With("model", model_dir)
            .With("num_nextn_predict_layers", engine->config_.num_nextn_predict_layers)
        << "speculative decoding asked for, but the model ships no MTP module: decoding one "
           "token a step";
    engine->options_.draft_tokens = 0;
  }
  const DeviceWeights* on = engine->on_device_ ? engine->on_device_->weights() : nullptr;
  engine->moe_ = std::make_unique<LocalMoeExecutor>(engine->config_, engine->weights_, on);
  engine->transformer_ =
      std::make_unique<Transformer>(engine->config_, engine->weights_, engine->moe_.get(), on);
  return engine;
}

absl::StatusOr<std::unique_ptr<SequenceCache>> Engine::NewCache(bool mtp) {
  if (on_device_ != nullptr) return on_device_->NewCache(mtp);
  return std::unique_ptr<SequenceCache>(std::make_unique<LatentCache>(
      mtp ? 1 : config_.num_hidden_layers, config_.latent_dim()));
}

absl::Status Engine::Prefill(absl::Span<const int32_t> tokens, SequenceCache* cache,
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
  SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<SequenceCache> cache, NewCache());
  std::vector<float> hidden;
  SPLITMOE_RETURN_IF_ERROR(Prefill(tokens, cache.get(), &hidden));
  ScoreResult result;
  result.tokens = tokens;
  result.prompt_logprobs.resize(static_cast<size_t>(n));
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (int64_t i = 1; i < n; ++i) {
    SPLITMOE_RETURN_IF_ERROR(
        transformer_->Logits(hidden.data() + (i - 1) * config_.hidden_size, 1, logits.data()));
    result.prompt_logprobs[static_cast<size_t>(i)] =
        ComputeLogprob(logits, tokens[i], top_logprobs);
  }
  if (with_mtp) {
    if (transformer_->mtp_modules() == 0) {
      return absl::FailedPreconditionError("the model has no MTP module");
    }
    if (n >= 3) {
      SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<SequenceCache> mtp_cache, NewCache(/*mtp=*/true));
      std::vector<float> mtp_logits;
      // Row i (i < n - 2) reads token i+1 and main hidden state i and predicts token i+2.
      for (int64_t begin = 0; begin < n - 2; begin += kPrefillChunkTokens) {
        const int64_t end = std::min(n - 2, begin + kPrefillChunkTokens);
        absl::Span<const int32_t> next(tokens.data() + begin + 1, static_cast<size_t>(end - begin));
        std::vector<SequenceChunk> mtp_batch = {{next, mtp_cache.get()}};
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

RequestShape ShapeOf(const GenerateRequest& r, bool has_tokenizer) {
  RequestShape shape;
  shape.prompt = r.prompt;
  shape.max_tokens = r.max_tokens;
  shape.logprobs = r.logprobs;
  shape.stop = r.stop;
  shape.stop_token_ids = r.stop_token_ids;
  shape.sampling = &r.sampling;
  shape.has_tokenizer = has_tokenizer;
  return shape;
}

absl::Status Engine::ValidateRequest(const GenerateRequest& r) const {
  return CheckRequest(config_, ShapeOf(r, tokenizer_ != nullptr));
}

absl::StatusOr<GenerateResult> Engine::Generate(const GenerateRequest& request,
                                                const TokenCallback& on_token) {
  SPLITMOE_RETURN_IF_ERROR(ValidateRequest(request));
  // The serving path with one sequence: the prefill worker's PrefillFirstToken, then the decode
  // worker's BatchDecoder, so the engine and the cluster sample, stop and score in one place.
  SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<SequenceCache> cache, NewCache());
  std::unique_ptr<SequenceCache> mtp_cache;
  if (options_.draft_tokens > 0) {
    SPLITMOE_ASSIGN_OR_RETURN(mtp_cache, NewCache(/*mtp=*/true));
  }
  std::vector<PrefillItem> prefill(1);
  prefill[0].prompt = request.prompt;
  prefill[0].cache = cache.get();
  prefill[0].mtp_cache = mtp_cache.get();
  prefill[0].sampling = request.sampling;
  prefill[0].logprobs = request.logprobs;
  SPLITMOE_RETURN_IF_ERROR(PrefillBatch(*transformer_, prefill, options_.prefill_form));
  SPLITMOE_RETURN_IF_ERROR(prefill[0].status);
  DecodedToken first = std::move(prefill[0].first);
  first.finish_reason = FinishReason(first.token, 1, request.max_tokens, config_.eos_token_id,
                                     request.ignore_eos, request.stop_token_ids);
  first.finished = !first.finish_reason.empty();

  tokenizer::TextStream text(tokenizer_.get(), request.stop);
  GenerateResult result;
  result.finish_reason = "length";
  // Appends one token; true when the sequence is done (its own stop, or a stop string).
  auto emit = [&](const DecodedToken& t) -> absl::StatusOr<bool> {
    result.tokens.push_back(t.token);
    if (t.logprob.has_value()) result.logprobs.push_back(*t.logprob);
    bool stopped_by_string = false;
    SPLITMOE_ASSIGN_OR_RETURN(std::string piece, text.Push(t.token, t.finished, &stopped_by_string));
    result.text += piece;
    if (on_token) on_token(t.token, piece);
    if (stopped_by_string) {
      result.finish_reason = "stop";
      return true;
    }
    if (t.finished) result.finish_reason = t.finish_reason;
    return t.finished;
  };
  SPLITMOE_ASSIGN_OR_RETURN(bool done, emit(first));
  if (done) return result;

  BatchDecoder decoder(transformer_.get(), config_.eos_token_id, nullptr, options_.draft_tokens);
  DecodeSequence sequence;
  sequence.id = "generate";
  sequence.prompt_tokens = static_cast<int64_t>(request.prompt.size());
  sequence.next_token = first.token;
  sequence.generated = 1;
  sequence.sampling = request.sampling;
  sequence.max_tokens = request.max_tokens;
  sequence.stop_token_ids = request.stop_token_ids;
  sequence.ignore_eos = request.ignore_eos;
  sequence.logprobs = request.logprobs;
  sequence.cache = std::move(cache);
  if (mtp_cache != nullptr) {
    sequence.mtp_cache = std::move(mtp_cache);
    sequence.mtp_tokens = {first.token};
    sequence.mtp_hidden = std::move(prefill[0].last_hidden);
  }
  SPLITMOE_RETURN_IF_ERROR(decoder.Add(std::move(sequence)));
  while (!done && decoder.running() > 0) {
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<DecodedToken> step, decoder.Step());
    for (const DecodedToken& t : step) {
      if (done) break;  // a stop string ended it: the step's later tokens are not the output
      SPLITMOE_ASSIGN_OR_RETURN(done, emit(t));
    }
  }
  result.speculative = decoder.speculative_stats();
  return result;
}

}  // namespace splitmoe::engine
