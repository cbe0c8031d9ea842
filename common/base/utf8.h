// UTF-8 helpers (the tokenizer, the router's request checks, the logger, the chat renderer): strict validation (what Rust's `str` accepts), lossy decoding
// that replaces each maximal ill-formed subpart with U+FFFD exactly like Rust's
// String::from_utf8_lossy (which HF `tokenizers` uses when decoding), and Unicode White_Space.
#ifndef SPLITMOE_COMMON_BASE_UTF8_H_
#define SPLITMOE_COMMON_BASE_UTF8_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace splitmoe::utf8 {

inline constexpr size_t kAllValid = static_cast<size_t>(-1);

// Returns the offset of the first byte that does not start a well-formed UTF-8 sequence (no
// overlongs, no surrogates, nothing above U+10FFFF), or kAllValid.
size_t FindInvalidUtf8(absl::string_view bytes);

// Appends `bytes` to `out` as UTF-8, replacing each maximal ill-formed subpart with U+FFFD.
// When `final` is false, a trailing sequence that is incomplete but could still become valid is
// left unconsumed. Returns the number of bytes consumed.
size_t AppendUtf8Lossy(absl::string_view bytes, bool final, std::string* out);

// Decodes the code point at `*pos` of well-formed UTF-8 and advances `*pos` past it.
char32_t DecodeCodePoint(absl::string_view s, size_t* pos);

void AppendCodePoint(char32_t cp, std::string* out);

// Unicode White_Space (Rust's char::is_whitespace; Oniguruma's and Rust regex's `\s`).
bool IsWhiteSpace(char32_t cp);

}  // namespace splitmoe::utf8

#endif  // SPLITMOE_COMMON_BASE_UTF8_H_
