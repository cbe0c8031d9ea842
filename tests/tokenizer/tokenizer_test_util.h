// Shared helpers for the tokenizer tests: where the real DeepSeek-V3 tokenizer lives, a
// process-wide loaded instance, and an independent UTF-8 validity check.
#ifndef SPLITMOE_TESTS_TOKENIZER_TOKENIZER_TEST_UTIL_H_
#define SPLITMOE_TESTS_TOKENIZER_TOKENIZER_TEST_UTIL_H_

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"

namespace splitmoe::tokenizer::testing {

inline std::string SourceDir() {
  const char* dir = std::getenv("SPLITMOE_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

inline std::string TokenizerDir() { return SourceDir() + "/third_party/tokenizer"; }

// The real tokenizer, loaded once per process; fails the calling test (and returns null) if it
// cannot be loaded.
inline const Tokenizer* RealTokenizer() {
  static const absl::StatusOr<std::unique_ptr<Tokenizer>>* loaded =
      new absl::StatusOr<std::unique_ptr<Tokenizer>>(Tokenizer::LoadFromDir(TokenizerDir()));
  if (!loaded->ok()) {
    ADD_FAILURE() << "cannot load the DeepSeek-V3 tokenizer from " << TokenizerDir() << ": "
                  << loaded->status() << " (run scripts/setup.sh)";
    return nullptr;
  }
  return loaded->value().get();
}

// Strict UTF-8 check written independently of the library's.
inline bool IsValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    int len;
    uint32_t cp;
    if (b < 0x80) {
      ++i;
      continue;
    } else if ((b & 0xE0) == 0xC0) {
      len = 2;
      cp = b & 0x1F;
    } else if ((b & 0xF0) == 0xE0) {
      len = 3;
      cp = b & 0x0F;
    } else if ((b & 0xF8) == 0xF0) {
      len = 4;
      cp = b & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (int k = 1; k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if ((c & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (c & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

inline std::vector<int32_t> Concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

}  // namespace splitmoe::tokenizer::testing

#endif  // SPLITMOE_TESTS_TOKENIZER_TOKENIZER_TEST_UTIL_H_
