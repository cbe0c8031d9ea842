// A compiled PCRE2 regex with the matching semantics HF `tokenizers` gets from Oniguruma: the
// pattern is compiled with PCRE2_UTF | PCRE2_UCP, after rewriting `\s` / `\S` so they mean
// Unicode White_Space exactly (PCRE2's UCP `\s` also matches U+180E MONGOLIAN VOWEL SEPARATOR,
// which stopped being White_Space in Unicode 6.3; Oniguruma and Rust's regex follow the property).
// Immutable after Compile() and safe to use from many threads (match state is thread-local).
#ifndef SPLITMOE_COMMON_TOKENIZER_INTERNAL_REGEX_H_
#define SPLITMOE_COMMON_TOKENIZER_INTERNAL_REGEX_H_

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

struct pcre2_real_code_8;

namespace splitmoe::tokenizer::internal {

// Rewrites `\s` and `\S` (inside and outside character classes) into White_Space-exact forms.
std::string TranslatePatternForPcre2(absl::string_view pattern);

// Escapes `literal` so that it matches itself.
std::string EscapeRegexLiteral(absl::string_view literal);

class Regex {
 public:
  // `pattern` uses Oniguruma/Rust-regex syntax as found in tokenizer.json.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(absl::string_view pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the [start, end) byte offsets of all successive non-overlapping matches in `subject`
  // (which must be valid UTF-8), like Oniguruma's find_iter: after an empty match that ends where
  // the previous match ended, the search resumes one character later.
  absl::Status FindAll(absl::string_view subject,
                       std::vector<std::pair<size_t, size_t>>* matches) const;

  const std::string& pattern() const { return pattern_; }

 private:
  Regex(std::string pattern, pcre2_real_code_8* code, bool jit)
      : pattern_(std::move(pattern)), code_(code), jit_(jit) {}

  std::string pattern_;
  pcre2_real_code_8* code_;
  bool jit_;
};

}  // namespace splitmoe::tokenizer::internal

#endif  // SPLITMOE_COMMON_TOKENIZER_INTERNAL_REGEX_H_
