#include "common/base/utf8.h"

#include <cstdint>

namespace splitmoe::utf8 {
namespace {

enum class SeqKind { kValid, kInvalid, kTruncated };

struct Seq {
  SeqKind kind;
  size_t len;  // kValid: sequence length; kInvalid/kTruncated: length of the maximal subpart.
};

// Classifies the sequence starting at p[0] (n >= 1 bytes available) per Unicode Table 3-7.
Seq ScanSequence(const unsigned char* p, size_t n) {
  const unsigned char b = p[0];
  if (b < 0x80) return {SeqKind::kValid, 1};
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2;
    lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2;
    hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3;
    lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3;
    hi = 0x8F;
  } else {
    return {SeqKind::kInvalid, 1};
  }
  for (size_t i = 1; i <= need; ++i) {
    if (i >= n) return {SeqKind::kTruncated, i};
    if (p[i] < lo || p[i] > hi) return {SeqKind::kInvalid, i};
    lo = 0x80;
    hi = 0xBF;
  }
  return {SeqKind::kValid, need + 1};
}

}  // namespace

size_t FindInvalidUtf8(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    Seq s = ScanSequence(p + i, n - i);
    if (s.kind != SeqKind::kValid) return i;
    i += s.len;
  }
  return kAllValid;
}

size_t AppendUtf8Lossy(absl::string_view bytes, bool final, std::string* out) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  size_t run_start = 0;  // Start of the pending run of valid bytes not yet copied.
  while (i < n) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    Seq s = ScanSequence(p + i, n - i);
    if (s.kind == SeqKind::kValid) {
      i += s.len;
      continue;
    }
    out->append(bytes.data() + run_start, i - run_start);
    if (s.kind == SeqKind::kTruncated && !final) return i;
    out->append("\xEF\xBF\xBD");
    i += s.len;
    run_start = i;
  }
  out->append(bytes.data() + run_start, n - run_start);
  return n;
}

char32_t DecodeCodePoint(absl::string_view s, size_t* pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = *pos;
  const unsigned char b = p[i];
  char32_t cp;
  size_t len;
  if (b < 0x80) {
    cp = b;
    len = 1;
  } else if (b < 0xE0) {
    cp = b & 0x1F;
    len = 2;
  } else if (b < 0xF0) {
    cp = b & 0x0F;
    len = 3;
  } else {
    cp = b & 0x07;
    len = 4;
  }
  for (size_t k = 1; k < len && i + k < s.size(); ++k) cp = (cp << 6) | (p[i + k] & 0x3F);
  *pos = i + len;
  return cp;
}

void AppendCodePoint(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsWhiteSpace(char32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  if (cp < 0x85) return false;
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

}  // namespace splitmoe::utf8
