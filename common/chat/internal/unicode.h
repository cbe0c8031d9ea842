// UTF-8 helpers with JavaScript's string semantics, for the Jinja renderer (jinja.h). The
// reference implementation (@huggingface/jinja) runs on JavaScript strings (UTF-16), so lengths
// and indices count UTF-16 code units, whitespace is ECMAScript's WhiteSpace + LineTerminator,
// string order is UTF-16 code unit order, and case mapping is ICU's full (not simple) mapping, as
// String.prototype.toUpperCase/toLowerCase do. Strings here are UTF-8 and, where the caller
// checked, valid. Pure functions; any thread.
//
//   JsToUpper("straße") == "STRASSE";  Utf16Length("😀") == 2;  IsJsWhitespace(0x3000) == true
#ifndef SPLITMOE_COMMON_CHAT_INTERNAL_UNICODE_H_
#define SPLITMOE_COMMON_CHAT_INTERNAL_UNICODE_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace splitmoe::chat::internal {

// Whether `s` is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool IsValidUtf8(absl::string_view s);

// Decodes the code point at s[*pos] and advances *pos past it. `s` must be valid UTF-8 and
// *pos < s.size().
char32_t NextCodePoint(absl::string_view s, size_t* pos);

// Appends `cp` (at most U+10FFFF, not a surrogate) to *out as UTF-8.
void AppendUtf8(char32_t cp, std::string* out);

// ECMAScript's WhiteSpace or LineTerminator (what JavaScript's \s and String.prototype.trim
// match): \t \n \v \f \r, space, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F,
// U+3000 and U+FEFF.
bool IsJsWhitespace(char32_t cp);

// String.prototype.trimStart / trimEnd / trim.
absl::string_view JsTrimStart(absl::string_view s);
absl::string_view JsTrimEnd(absl::string_view s);
absl::string_view JsTrim(absl::string_view s);

// String.prototype.toUpperCase / toLowerCase (with Final_Sigma for toLowerCase).
std::string JsToUpper(absl::string_view s);
std::string JsToLower(absl::string_view s);

// The length of `s` in UTF-16 code units (String.prototype.length).
size_t Utf16Length(absl::string_view s);

// Compares as JavaScript's < does on strings: by UTF-16 code units. Returns <0, 0 or >0.
int CompareUtf16(absl::string_view a, absl::string_view b);

}  // namespace splitmoe::chat::internal

#endif  // SPLITMOE_COMMON_CHAT_INTERNAL_UNICODE_H_
