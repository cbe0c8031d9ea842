#include "common/chat/internal/unicode.h"

#include <algorithm>
#include <cstdint>
#include <iterator>

#include "common/base/utf8.h"

namespace splitmoe::chat::internal {
namespace {

// A run of code points [first, last] (every `stride`-th one) that maps to cp + delta.
struct CaseRun {
  char32_t first;
  char32_t last;
  int32_t delta;
  int32_t stride;
};
// A code point that maps to up to three code points (0-terminated when shorter).
struct CaseMulti {
  char32_t cp;
  char32_t to[3];
};
struct CodePointRange {
  char32_t first;
  char32_t last;
};

#include "common/chat/internal/unicode_tables.inc"

template <size_t N>
bool InRanges(const CodePointRange (&ranges)[N], char32_t cp) {
  const CodePointRange* it =
      std::upper_bound(std::begin(ranges), std::end(ranges), cp,
                       [](char32_t c, const CodePointRange& r) { return c < r.first; });
  return it != std::begin(ranges) && cp <= std::prev(it)->last;
}

// Appends the mapping of `cp` by the tables (runs, multi) to *out.
template <size_t R, size_t M>
void AppendMapped(const CaseRun (&runs)[R], const CaseMulti (&multi)[M], char32_t cp,
                  std::string* out) {
  const CaseMulti* m = std::lower_bound(std::begin(multi), std::end(multi), cp,
                                        [](const CaseMulti& e, char32_t c) { return e.cp < c; });
  if (m != std::end(multi) && m->cp == cp) {
    for (char32_t c : m->to) {
      if (c != 0) AppendUtf8(c, out);
    }
    return;
  }
  const CaseRun* it = std::upper_bound(std::begin(runs), std::end(runs), cp,
                                       [](char32_t c, const CaseRun& r) { return c < r.first; });
  if (it != std::begin(runs)) {
    const CaseRun& r = *std::prev(it);
    if (cp <= r.last && (cp - r.first) % r.stride == 0) {
      AppendUtf8(static_cast<char32_t>(static_cast<int64_t>(cp) + r.delta), out);
      return;
    }
  }
  AppendUtf8(cp, out);
}

bool IsCased(char32_t cp) { return InRanges(kCased, cp); }
bool IsCaseIgnorable(char32_t cp) { return InRanges(kCaseIgnorable, cp); }

// The code point that ends just before byte `pos` of valid UTF-8 `s`; *start gets its offset.
char32_t PrevCodePoint(absl::string_view s, size_t pos, size_t* start) {
  size_t p = pos - 1;
  while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
  *start = p;
  size_t q = p;
  return NextCodePoint(s, &q);
}

// Unicode's Final_Sigma condition for the capital sigma at bytes [pos, next) of `s`.
bool IsFinalSigma(absl::string_view s, size_t pos, size_t next) {
  bool cased_before = false;
  size_t p = pos;
  while (p > 0) {
    size_t start;
    const char32_t c = PrevCodePoint(s, p, &start);
    p = start;
    if (IsCaseIgnorable(c)) continue;
    cased_before = IsCased(c);
    break;
  }
  if (!cased_before) return false;
  size_t q = next;
  while (q < s.size()) {
    const char32_t c = NextCodePoint(s, &q);
    if (IsCaseIgnorable(c)) continue;
    return !IsCased(c);
  }
  return true;
}

}  // namespace

bool IsValidUtf8(absl::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    char32_t cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      const unsigned char d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

char32_t NextCodePoint(absl::string_view s, size_t* pos) {
  const unsigned char c = static_cast<unsigned char>(s[*pos]);
  if (c < 0x80) {
    ++*pos;
    return c;
  }
  size_t len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
  char32_t cp = c & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
  for (size_t k = 1; k < len && *pos + k < s.size(); ++k) {
    cp = (cp << 6) | (static_cast<unsigned char>(s[*pos + k]) & 0x3F);
  }
  *pos += len;
  return cp;
}

void AppendUtf8(char32_t cp, std::string* out) { utf8::AppendCodePoint(cp, out); }

bool IsJsWhitespace(char32_t cp) {
  if (cp <= 32) return cp == 32 || (cp >= 9 && cp <= 13);
  return cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
         cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000 || cp == 0xFEFF;
}

absl::string_view JsTrimStart(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t next = i;
    if (!IsJsWhitespace(NextCodePoint(s, &next))) break;
    i = next;
  }
  return s.substr(i);
}

absl::string_view JsTrimEnd(absl::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start;
    if (!IsJsWhitespace(PrevCodePoint(s, end, &start))) break;
    end = start;
  }
  return s.substr(0, end);
}

absl::string_view JsTrim(absl::string_view s) { return JsTrimEnd(JsTrimStart(s)); }

std::string JsToUpper(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out.push_back(c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : static_cast<char>(c));
      ++i;
      continue;
    }
    AppendMapped(kUpperRuns, kUpperMulti, NextCodePoint(s, &i), &out);
  }
  return out;
}

std::string JsToLower(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out.push_back(c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : static_cast<char>(c));
      ++i;
      continue;
    }
    const size_t pos = i;
    const char32_t cp = NextCodePoint(s, &i);
    if (cp == 0x3A3 && IsFinalSigma(s, pos, i)) {
      AppendUtf8(0x3C2, &out);
      continue;
    }
    AppendMapped(kLowerRuns, kLowerMulti, cp, &out);
  }
  return out;
}

size_t Utf16Length(absl::string_view s) {
  size_t n = 0;
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if ((c & 0xC0) != 0x80) ++n;  // one unit per code point...
    if ((c & 0xF8) == 0xF0) ++n;  // ...and two for those past U+FFFF (4-byte sequences)
  }
  return n;
}

int CompareUtf16(absl::string_view a, absl::string_view b) {
  // UTF-8 byte order is code point order; it differs from UTF-16 order only where one side has a
  // code point past U+FFFF (a surrogate, 0xD800-0xDBFF) and the other one in U+E000-U+FFFF.
  size_t i = 0;
  size_t j = 0;
  while (i < a.size() && j < b.size()) {
    const char32_t x = NextCodePoint(a, &i);
    const char32_t y = NextCodePoint(b, &j);
    if (x == y) continue;
    auto key = [](char32_t c) -> uint32_t {
      return c >= 0x10000 ? 0xD800 + ((c - 0x10000) >> 10) : c;
    };
    const uint32_t kx = key(x);
    const uint32_t ky = key(y);
    if (kx != ky) return kx < ky ? -1 : 1;
    return x < y ? -1 : 1;  // both past U+FFFF with the same high surrogate
  }
  if (i < a.size()) return 1;
  if (j < b.size()) return -1;
  return 0;
}

}  // namespace splitmoe::chat::internal
