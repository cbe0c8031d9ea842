// What `splitmoe generate` does on every backend (CPU engine, GPU engine): the request built from
// the flags, and the JSON printed for the result.
#ifndef SPLITMOE_TOOLS_CLI_GENERATE_COMMON_H_
#define SPLITMOE_TOOLS_CLI_GENERATE_COMMON_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/engine.h"
#include "common/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tools/cli/flags.h"

namespace splitmoe::cli {

// The prompt as token ids: --prompt-tokens, or --prompt encoded with `tokenizer` (BOS added as
// tokenizer_config.json says; null: --prompt is refused).
absl::StatusOr<std::vector<int32_t>> PromptTokens(const Flags& f,
                                                  const tokenizer::Tokenizer* tokenizer);

// --prompt/--prompt-tokens, --max-tokens, sampling, --logprobs, --stop, --stop-token-ids,
// --ignore-eos.
absl::StatusOr<engine::GenerateRequest> GenerateRequestFromFlags(
    const Flags& f, const tokenizer::Tokenizer* tokenizer);

nlohmann::json LogprobJson(const engine::TokenLogprob& lp);

// {"tokens", "text", "logprobs", "finish_reason"} on one line.
void PrintGenerateJson(const engine::GenerateResult& r);

// --speculative mtp|none and --draft-tokens K (generate, decode, up): K draft tokens per
// verification pass, 0 when speculative decoding is off (the default).
inline constexpr int64_t kDefaultDraftTokens = 2;
inline constexpr int64_t kMaxDraftTokens = 16;
absl::StatusOr<int64_t> DraftTokensFromFlags(const Flags& f);

// --attention auto|absorbed|naive: the form of prompt passes (engine::AttentionForm; auto, the
// default, picks the cheaper form per chunk: expanded for prompts, absorbed for decode).
absl::StatusOr<engine::AttentionForm> AttentionFormFromFlags(const Flags& f);

}  // namespace splitmoe::cli

#endif  // SPLITMOE_TOOLS_CLI_GENERATE_COMMON_H_
