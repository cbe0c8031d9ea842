#include "tools/cli/generate_common.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

namespace splitmoe::cli {

absl::StatusOr<std::vector<int32_t>> PromptTokens(const Flags& f,
                                                  const tokenizer::Tokenizer* tokenizer) {
  if (f.Has("prompt-tokens") == f.Has("prompt")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT and --prompt-tokens IDS");
  }
  if (f.Has("prompt-tokens")) return f.GetIntList("prompt-tokens");
  if (tokenizer == nullptr) {
    return absl::FailedPreconditionError(
        "--prompt needs tokenizer.json in the model directory; use --prompt-tokens");
  }
  return tokenizer->Encode(f.Get("prompt"), /*add_special_tokens=*/true);
}

absl::StatusOr<engine::GenerateRequest> GenerateRequestFromFlags(
    const Flags& f, const tokenizer::Tokenizer* tokenizer) {
  engine::GenerateRequest req;
  SPLITMOE_ASSIGN_OR_RETURN(req.prompt, PromptTokens(f, tokenizer));
  SPLITMOE_ASSIGN_OR_RETURN(req.max_tokens, f.GetInt("max-tokens", 16));
  SPLITMOE_ASSIGN_OR_RETURN(req.sampling.temperature, f.GetDouble("temperature", 0.0));
  SPLITMOE_ASSIGN_OR_RETURN(req.sampling.top_p, f.GetDouble("top-p", 1.0));
  SPLITMOE_ASSIGN_OR_RETURN(req.sampling.top_k, f.GetInt("top-k", 0));
  SPLITMOE_ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 0));
  req.sampling.seed = static_cast<uint64_t>(seed);
  SPLITMOE_ASSIGN_OR_RETURN(req.logprobs, f.GetInt("logprobs", -1));
  req.stop = f.GetAll("stop");
  if (f.Has("stop-token-ids")) {
    SPLITMOE_ASSIGN_OR_RETURN(req.stop_token_ids, f.GetIntList("stop-token-ids"));
  }
  req.ignore_eos = f.Has("ignore-eos");
  return req;
}

nlohmann::json LogprobJson(const engine::TokenLogprob& lp) {
  nlohmann::json top = nlohmann::json::array();
  for (const auto& [id, value] : lp.top) top.push_back({id, value});
  return {{"token", lp.token}, {"logprob", lp.logprob}, {"top_logprobs", top}};
}

void PrintGenerateJson(const engine::GenerateResult& r) {
  nlohmann::json lps = nlohmann::json::array();
  for (const auto& lp : r.logprobs) lps.push_back(LogprobJson(lp));
  nlohmann::json out = {{"tokens", r.tokens},
                        {"text", r.text},
                        {"logprobs", lps},
                        {"finish_reason", r.finish_reason}};
  if (r.speculative.verify_passes > 0) {
    const engine::SpeculativeStats& st = r.speculative;
    out["speculative"] = {{"drafted", st.drafted},
                          {"accepted", st.accepted},
                          {"acceptance_rate", st.acceptance_rate()},
                          {"verify_passes", st.verify_passes},
                          {"tokens_per_pass", st.tokens_per_pass()}};
  }
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

absl::StatusOr<engine::AttentionForm> AttentionFormFromFlags(const Flags& f) {
  const std::string form = f.Get("attention", "auto");
  if (form == "auto") return engine::AttentionForm::kAuto;
  if (form == "absorbed") return engine::AttentionForm::kAbsorbed;
  if (form == "naive") return engine::AttentionForm::kNaive;
  return absl::InvalidArgumentError(
      absl::StrCat("--attention must be auto, absorbed or naive, got '", form, "'"));
}

absl::StatusOr<int64_t> DraftTokensFromFlags(const Flags& f) {
  const std::string mode = f.Get("speculative", "none");
  if (mode != "none" && mode != "mtp") {
    return absl::InvalidArgumentError(
        absl::StrCat("--speculative must be mtp or none, got '", mode, "'"));
  }
  if (mode == "none") {
    if (f.Has("draft-tokens")) {
      return absl::InvalidArgumentError("--draft-tokens needs --speculative mtp");
    }
    return 0;
  }
  SPLITMOE_ASSIGN_OR_RETURN(int64_t k, f.GetInt("draft-tokens", kDefaultDraftTokens));
  if (k < 1 || k > kMaxDraftTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("--draft-tokens must be in [1, ", kMaxDraftTokens, "], got ", k));
  }
  return k;
}

}  // namespace splitmoe::cli
