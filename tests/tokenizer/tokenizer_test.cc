// Unit tests of splitmoe::tokenizer: the real DeepSeek-V3 tokenizer (known ids, round trips,
// added tokens in text, errors, streaming detokenization, speed, thread safety) and small
// synthetic tokenizer.json files for the HF semantics DeepSeek-V3 does not exercise (lstrip /
// rstrip / single_word added tokens, Split behaviours, merge formats, load errors).
#include "common/tokenizer/tokenizer.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/tokenizer/internal/regex.h"
#include "common/tokenizer/internal/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/special_files.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace splitmoe::tokenizer {
namespace {

using ::splitmoe::tokenizer::testing::Concat;
using ::splitmoe::tokenizer::testing::IsValidUtf8;
using ::splitmoe::tokenizer::testing::RealTokenizer;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

constexpr int32_t kBos = 0;
constexpr int32_t kEos = 1;
constexpr int32_t kUser = 128803;       // <｜User｜>, added, not special.
constexpr int32_t kAssistant = 128804;  // <｜Assistant｜>, added, not special.

std::vector<int32_t> Enc(const Tokenizer& tok, const std::string& text, bool special = false) {
  absl::StatusOr<std::vector<int32_t>> ids = tok.Encode(text, special);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

std::string Dec(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip = false) {
  absl::StatusOr<std::string> text = tok.Decode(ids, skip);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

// Streams `ids` through an IncrementalDetokenizer, checking each piece is valid UTF-8; returns
// the pieces (Finish() last).
std::vector<std::string> Stream(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip) {
  IncrementalDetokenizer detok(tok, skip);
  std::vector<std::string> pieces;
  for (int32_t id : ids) {
    absl::StatusOr<std::string> piece = detok.Push(id);
    EXPECT_TRUE(piece.ok()) << piece.status();
    if (!piece.ok()) return pieces;
    EXPECT_TRUE(IsValidUtf8(*piece)) << "Push(" << id << ") emitted invalid UTF-8";
    pieces.push_back(*piece);
  }
  pieces.push_back(detok.Finish());
  EXPECT_TRUE(IsValidUtf8(pieces.back()));
  return pieces;
}

std::string Join(const std::vector<std::string>& pieces) {
  std::string out;
  for (const auto& p : pieces) out += p;
  return out;
}

// ---------------------------------------------------------------------------------------------
// The real DeepSeek-V3 tokenizer.

TEST(RealTokenizerTest, Metadata) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 128815);
  EXPECT_EQ(tok->bos_id(), kBos);
  EXPECT_EQ(tok->eos_id(), kEos);
  EXPECT_THAT(tok->chat_template(), HasSubstr("<｜Assistant｜>"));
  EXPECT_EQ(tok->TokenText(kBos), "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(tok->TokenText(kUser), "<｜User｜>");
  EXPECT_EQ(tok->TokenText(19923), "Hello");
  EXPECT_EQ(tok->TokenText(2058), "Ġworld");
  EXPECT_EQ(tok->TokenText(-1), std::nullopt);
  EXPECT_EQ(tok->TokenText(tok->vocab_size()), std::nullopt);
  EXPECT_TRUE(tok->IsSpecial(kBos));
  EXPECT_TRUE(tok->IsSpecial(kEos));
  EXPECT_FALSE(tok->IsSpecial(kUser));
  EXPECT_FALSE(tok->IsSpecial(19923));
}

TEST(RealTokenizerTest, KnownIds) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  // Ids from HF / the JS oracle.
  EXPECT_THAT(Enc(*tok, "Hello world"), ElementsAre(19923, 2058));
  EXPECT_THAT(Enc(*tok, "Hello world", true), ElementsAre(kBos, 19923, 2058));
  EXPECT_THAT(Enc(*tok, ""), ElementsAre());
  EXPECT_THAT(Enc(*tok, "", true), ElementsAre(kBos));
  EXPECT_THAT(Enc(*tok, "你好 123456 <｜User｜>hi<｜begin▁of▁sentence｜>"),
              ElementsAre(30594, 223, 6895, 18009, 223, kUser, 6366, kBos));
}

TEST(RealTokenizerTest, RoundTrip) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  for (const std::string& s : std::vector<std::string>{
           "Hello, world!",
           "  leading and trailing  ",
           "tabs\tand\nnewlines\r\n",
           "12345678901234",
           "深度求索 DeepSeek-V3",
           "こんにちは世界",
           "안녕하세요",
           "👨‍👩‍👧‍👦 🇯🇵 👍🏽",
           "∑ᵢ xᵢ² ≤ ∞",
           "def f(x):\n    return x ** 2\n",
           "naïve café",
           "مرحبا",
           "नमस्ते",
           "\xF0\xA0\x80\x80",
           "<｜User｜>hi<｜Assistant｜>ok<｜end▁of▁sentence｜>",
           std::string(1000, ' '),
       }) {
    std::vector<int32_t> ids = Enc(*tok, s);
    EXPECT_EQ(Dec(*tok, ids), s);
    std::vector<int32_t> with_bos = Enc(*tok, s, true);
    ASSERT_FALSE(with_bos.empty());
    EXPECT_EQ(with_bos[0], kBos);
    EXPECT_EQ(std::vector<int32_t>(with_bos.begin() + 1, with_bos.end()), ids);
  }
}

TEST(RealTokenizerTest, AddedTokensInText) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Enc(*tok, "<｜User｜><｜Assistant｜>"), ElementsAre(kUser, kAssistant));
  std::vector<int32_t> ids = Enc(*tok, "a<｜User｜>b<｜begin▁of▁sentence｜>c");
  EXPECT_EQ(ids, Concat({Enc(*tok, "a"), {kUser}, Enc(*tok, "b"), {kBos}, Enc(*tok, "c")}));
  // Near misses are ordinary text.
  for (int32_t id : Enc(*tok, "<｜User and <｜User| and <|User｜>")) EXPECT_LT(id, 128000);
  // skip_special_tokens drops BOS/EOS (special) but keeps <｜User｜> (added, not special).
  std::vector<int32_t> chat = Enc(*tok, "<｜User｜>hi<｜end▁of▁sentence｜>", true);
  EXPECT_EQ(Dec(*tok, chat, /*skip=*/false),
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜end▁of▁sentence｜>");
  EXPECT_EQ(Dec(*tok, chat, /*skip=*/true), "<｜User｜>hi");
}

TEST(RealTokenizerTest, InvalidUtf8IsRejected) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  for (const std::string& bad : {std::string("\xFF"), std::string("abc\xC3"),
                                 std::string("\xC0\xAF"),          // overlong '/'
                                 std::string("\xED\xA0\x80"),      // surrogate
                                 std::string("\xF4\x90\x80\x80"),  // > U+10FFFF
                                 std::string("ok \x80 continuation"), std::string("\xE4\xBD")}) {
    absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(bad, false);
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument) << ids.status();
  }
}

TEST(RealTokenizerTest, NegativeIdsAreRejectedAndUnassignedIdsDecodeToNothing) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  absl::StatusOr<std::string> text = tok->Decode({19923, -1}, false);
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(text.status().message(), HasSubstr("-1"));
  const std::string hello = *tok->Decode({19923}, false);
  for (int32_t padded : {tok->vocab_size(), 129279, 999999}) {
    absl::StatusOr<std::string> t = tok->Decode({19923, padded}, false);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(*t, hello);
  }
  EXPECT_TRUE(tok->Decode({tok->vocab_size() - 1}, false).ok());
}

int32_t IdOfText(const Tokenizer& tok, const std::string& token_text) {
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (tok.TokenText(id) == token_text) return id;
  }
  return -1;
}

TEST(RealTokenizerTest, DecodeReplacesInvalidBytes) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  const int32_t byte_ff = IdOfText(*tok, "ÿ");  // Byte-level char for byte 0xFF.
  const int32_t byte_e4 = IdOfText(*tok, "ä");  // 0xE4: lead byte of a 3-byte sequence.
  const int32_t byte_bd = IdOfText(*tok, "½");  // 0xBD: continuation byte.
  ASSERT_GE(byte_ff, 0);
  ASSERT_GE(byte_e4, 0);
  ASSERT_GE(byte_bd, 0);
  const int32_t a = Enc(*tok, "a")[0];
  EXPECT_EQ(Dec(*tok, {a, byte_ff, a}), "a\uFFFDa");
  // A truncated sequence is one U+FFFD (Rust from_utf8_lossy's maximal subpart).
  EXPECT_EQ(Dec(*tok, {byte_e4, byte_bd, a}), "\uFFFDa");
  EXPECT_EQ(Dec(*tok, {byte_e4, byte_bd}), "\uFFFD");
  EXPECT_EQ(Dec(*tok, {byte_bd, byte_bd}), "\uFFFD\uFFFD");
  EXPECT_EQ(Dec(*tok, {byte_e4, byte_bd, IdOfText(*tok, "ł")}), "你");  // E4 BD A0
}

TEST(RealTokenizerTest, IncrementalHoldsBackSplitCharacters) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  // A rare character is encoded as several byte-level tokens: nothing may come out until the
  // character is complete.
  const std::string rare = "\xF0\xAA\x9A\xA5";  // U+2A6A5 (CJK Extension B).
  std::vector<int32_t> ids = Enc(*tok, "x" + rare + "y");
  ASSERT_GE(ids.size(), 4u) << "expected U+2A6A5 to be split across tokens";
  std::vector<std::string> pieces = Stream(*tok, ids, false);
  EXPECT_EQ(Join(pieces), "x" + rare + "y");
  bool held_back = false;
  for (size_t i = 0; i + 1 < pieces.size(); ++i) held_back |= pieces[i].empty();
  EXPECT_TRUE(held_back);
  EXPECT_EQ(pieces.back(), "");

  // An unfinished character at the end becomes U+FFFD at Finish(), as Decode does.
  std::vector<int32_t> cut(ids.begin(), ids.end() - 2);
  std::vector<std::string> cut_pieces = Stream(*tok, cut, false);
  EXPECT_EQ(Join(cut_pieces), Dec(*tok, cut));
  EXPECT_EQ(cut_pieces.back(), "\uFFFD");
}

TEST(RealTokenizerTest, IncrementalMatchesDecode) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  for (const std::string& s : std::vector<std::string>{
           "👨‍👩‍👧‍👦 family 🏳️‍🌈 flag 🇺🇸🇯🇵 done",
           "🫠🪿🧌 newer emoji",
           "龘靐齉 rare 𠀀𪚥𫝀",
           "<｜begin▁of▁sentence｜>你好<｜User｜>😀<｜end▁of▁sentence｜>",
           "e\u0301\u0302 x",
       }) {
    std::vector<int32_t> ids = Enc(*tok, s, true);
    for (bool skip : {false, true}) {
      EXPECT_EQ(Join(Stream(*tok, ids, skip)), Dec(*tok, ids, skip)) << s;
    }
  }
  // Arbitrary id sequences produce arbitrary bytes: still valid UTF-8 out of every Push(), and
  // the same text as Decode (including U+FFFD placement).
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> any_id(0, tok->vocab_size() - 1);
  std::uniform_int_distribution<int32_t> byte_token(0, 900);  // Mostly short/byte tokens.
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int32_t> ids;
    for (int i = 0; i < 40; ++i) ids.push_back(trial % 2 ? any_id(rng) : byte_token(rng));
    for (bool skip : {false, true}) {
      EXPECT_EQ(Join(Stream(*tok, ids, skip)), Dec(*tok, ids, skip));
    }
  }
}

TEST(RealTokenizerTest, IncrementalRejectsBadIdAndKeepsState) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  std::vector<int32_t> ids = Enc(*tok, "\xF0\xAA\x9A\xA5");
  ASSERT_GE(ids.size(), 2u);
  IncrementalDetokenizer detok(*tok, false);
  std::string out;
  out += *detok.Push(ids[0]);
  absl::StatusOr<std::string> bad = detok.Push(-7);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("-7"));
  for (size_t i = 1; i < ids.size(); ++i) out += *detok.Push(ids[i]);
  out += detok.Finish();
  EXPECT_EQ(out, "\xF0\xAA\x9A\xA5");
}

// HF compiles the Split regexes with Oniguruma, whose `\s` is Unicode White_Space. PCRE2's UCP
// `\s` also matches U+180E, and JavaScript's adds U+FEFF and drops U+0085.
TEST(RegexTest, WhiteSpaceClassIsUnicodeWhiteSpace) {
  auto space = internal::Regex::Compile(R"(^\s$)");
  auto non_space = internal::Regex::Compile(R"(^\S$)");
  auto in_class = internal::Regex::Compile(R"(^[\sx]$)");
  auto negated_class = internal::Regex::Compile(R"(^[^\sx]$)");
  ASSERT_TRUE(space.ok() && non_space.ok() && in_class.ok() && negated_class.ok());
  auto matches = [](const internal::Regex& re, char32_t cp) {
    std::string s;
    internal::AppendCodePoint(cp, &s);
    std::vector<std::pair<size_t, size_t>> m;
    EXPECT_TRUE(re.FindAll(s, &m).ok());
    return !m.empty();
  };
  const std::vector<char32_t> white = {0x9,    0xA,    0xB,    0xC,    0xD,    0x20,
                                       0x85,   0xA0,   0x1680, 0x2000, 0x2005, 0x200A,
                                       0x2028, 0x2029, 0x202F, 0x205F, 0x3000};
  const std::vector<char32_t> not_white = {0x180E, 0xFEFF,  0x200B, 0x1C,   0x1F,
                                           0x2060, 'x' + 1, 0x4E00, 0x1F600};
  for (char32_t cp : white) {
    EXPECT_TRUE(matches(**space, cp)) << std::hex << static_cast<uint32_t>(cp);
    EXPECT_FALSE(matches(**non_space, cp)) << std::hex << static_cast<uint32_t>(cp);
    EXPECT_TRUE(matches(**in_class, cp)) << std::hex << static_cast<uint32_t>(cp);
    EXPECT_FALSE(matches(**negated_class, cp)) << std::hex << static_cast<uint32_t>(cp);
  }
  for (char32_t cp : not_white) {
    EXPECT_FALSE(matches(**space, cp)) << std::hex << static_cast<uint32_t>(cp);
    EXPECT_TRUE(matches(**non_space, cp)) << std::hex << static_cast<uint32_t>(cp);
    EXPECT_FALSE(matches(**in_class, cp)) << std::hex << static_cast<uint32_t>(cp);
    EXPECT_TRUE(matches(**negated_class, cp)) << std::hex << static_cast<uint32_t>(cp);
  }
}

TEST(RealTokenizerTest, WhiteSpaceSemanticsFollowHf) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  // U+FEFF is not whitespace for HF: "  \uFEFFx" pre-tokenizes as " ", " ", "\uFEFFx".
  // (JavaScript's \s includes U+FEFF, so transformers.js gives "  ", "\uFEFFx" = 262, 15251, 90.)
  EXPECT_THAT(Enc(*tok, "  \uFEFFx"), ElementsAre(223, 223, 15251, 90));
  EXPECT_EQ(Enc(*tok, "  \uFEFFx"), Concat({Enc(*tok, " "), Enc(*tok, " "), Enc(*tok, "\uFEFFx")}));
  // U+0085 is whitespace for HF: " \u0085\n" is one `\s*[\r\n]+` piece.
  // (transformers.js: " ", "\u0085", "\n" = 223, 129, 230, 201.)
  EXPECT_THAT(Enc(*tok, "a \u0085\n"), ElementsAre(67, 1203, 230, 201));
  // U+180E is not whitespace for HF (PCRE2's own UCP \s would say it is and give "  ", "\u180Ex").
  EXPECT_EQ(Enc(*tok, "  \u180Ex"), Concat({Enc(*tok, " "), Enc(*tok, " "), Enc(*tok, "\u180Ex")}));
  EXPECT_THAT(Enc(*tok, "  \u180Ex"), ElementsAre(223, 223, 115522, 239, 90));
}

std::string MixedText(size_t bytes, uint32_t seed) {
  static const char* kParts[] = {
      "The quick brown fox jumps over the lazy dog. ",
      "Large language models are trained on trillions of tokens; ",
      "def f(x):\n    return x * 2  # double\n",
      "for (int i = 0; i < n; ++i) { sum += a[i]; }\n",
      "深度求索是一家人工智能公司。",
      "こんにちは、世界！",
      "안녕하세요. ",
      "😀👍🏽 ",
      "    \n\n",
      "\"quoted\", (parens), [brackets]; ",
  };
  std::mt19937 rng(seed);
  std::string text;
  while (text.size() < bytes) {
    text += kParts[rng() % (sizeof(kParts) / sizeof(kParts[0]))];
    if (rng() % 4 == 0) text += absl::StrCat(rng() % 100000, " ");
    if (rng() % 4 == 0) {  // A made-up word, so the word cache does not see only repeats.
      for (int i = 0, n = 3 + rng() % 8; i < n; ++i) text += static_cast<char>('a' + rng() % 26);
      text += ' ';
    }
  }
  return text;
}

TEST(RealTokenizerTest, EncodesAMegabyteQuickly) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  const std::string text = MixedText(1 << 20, 7);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids = Enc(*tok, text);
  const auto t1 = std::chrono::steady_clock::now();
  std::string decoded = Dec(*tok, ids);
  const auto t2 = std::chrono::steady_clock::now();
  const double encode_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  const double mb = text.size() / 1e6;
  std::printf("encode: %.2f MB in %.3f s = %.1f MB/s (%zu tokens); decode: %.1f MB/s\n", mb,
              encode_s, mb / encode_s, ids.size(), mb / decode_s);
  EXPECT_EQ(decoded, text);
#ifdef NDEBUG
  EXPECT_LT(encode_s, 1.0);
#else
  EXPECT_LT(encode_s, 5.0);  // Unoptimised (and maybe sanitised) build.
#endif
}

TEST(RealTokenizerTest, ConcurrentEncodeMatchesSequential) {
  const Tokenizer* tok = RealTokenizer();
  ASSERT_NE(tok, nullptr);
  std::vector<std::string> texts;
  for (uint32_t i = 0; i < 8; ++i) texts.push_back(MixedText(20000, 100 + i));
  std::vector<std::vector<int32_t>> expected;
  for (const auto& t : texts) expected.push_back(Enc(*tok, t));
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      for (int round = 0; round < 3; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          auto ids = tok->Encode(texts[(i + w) % texts.size()], false);
          if (!ids.ok() || *ids != expected[(i + w) % texts.size()]) ++failures[w];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

// ---------------------------------------------------------------------------------------------
// Synthetic tokenizers.

std::string ByteChar(int b) {
  // GPT-2 bytes_to_unicode, written out independently of the library.
  const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
  int cp = b;
  if (!direct) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE))) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  internal::AppendCodePoint(static_cast<char32_t>(cp), &s);
  return s;
}

// Vocabulary: byte b has id b; then "he" 256, "ll" 257, "hell" 258, "hello" 259, "Ġw" 260,
// "--" 261, "a-" 262, "-b" 263. Added: <s> 300 (special), <mask> 301 (special, lstrip, rstrip),
// <w> 302 (single_word), </s> 303 (special).
Json SyntheticTokenizerJson(const Json& pre_tokenizer) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  const std::vector<std::string> extra = {"he", "ll", "hell", "hello", "Ġw", "--", "a-", "-b"};
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + static_cast<int>(i);
  Json merges = Json::array({"h e", "l l", Json::array({"he", "ll"}), "hell o", "Ġ w", "- -",
                             Json::array({"a", "-"}), "- b"});
  auto added = [](int id, const char* content, bool special, bool lstrip, bool rstrip,
                  bool single_word) {
    return Json{{"id", id},
                {"content", content},
                {"special", special},
                {"lstrip", lstrip},
                {"rstrip", rstrip},
                {"single_word", single_word},
                {"normalized", !special}};
  };
  return Json{
      {"version", "1.0"},
      {"added_tokens", Json::array({added(300, "<s>", true, false, false, false),
                                    added(301, "<mask>", true, true, true, false),
                                    added(302, "<w>", false, false, false, true),
                                    added(303, "</s>", true, false, false, false)})},
      {"normalizer", nullptr},
      {"pre_tokenizer", pre_tokenizer},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}},
  };
}

Json ByteLevelPreTokenizer(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", use_regex}};
}

class SyntheticTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           absl::StrCat("splitmoe_tokenizer_test_", ::getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void Write(const std::string& name, const std::string& content) {
    std::ofstream(dir_ / name) << content;
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const Json& tokenizer_json,
                                                  const Json* config = nullptr) {
    Write("tokenizer.json", tokenizer_json.dump());
    if (config != nullptr) Write("tokenizer_config.json", config->dump());
    return Tokenizer::LoadFromDir(dir_.string());
  }

  std::filesystem::path dir_;
};

TEST_F(SyntheticTest, MergesInBothFormatsAndConfig) {
  const Json config = {
      {"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}}},
      {"eos_token", "</s>"},
      {"add_bos_token", true},
      {"add_eos_token", true},
      {"chat_template", Json::array({{{"name", "tool_use"}, {"template", "T"}},
                                     {{"name", "default"}, {"template", "D"}}})},
  };
  auto tok = Load(SyntheticTokenizerJson(ByteLevelPreTokenizer(true)), &config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 304);
  EXPECT_EQ((*tok)->bos_id(), 300);
  EXPECT_EQ((*tok)->eos_id(), 303);
  EXPECT_EQ((*tok)->chat_template(), "D");
  EXPECT_EQ((*tok)->TokenText(280), std::nullopt);  // A hole in the id space.
  EXPECT_EQ(*(*tok)->Decode({280}, false), "");  // HF: an id with no token decodes to nothing.
  // "hell" comes from an [a, b] merge, "hello" from an "a b" one.
  EXPECT_THAT(Enc(**tok, "hello world"), ElementsAre(259, 260, 'o', 'r', 'l', 'd'));
  EXPECT_THAT(Enc(**tok, "hello", true), ElementsAre(300, 259, 303));
}

TEST_F(SyntheticTest, AddedTokenFlags) {
  auto tok = Load(SyntheticTokenizerJson(ByteLevelPreTokenizer(true)));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), -1);  // No tokenizer_config.json.
  EXPECT_EQ((*tok)->chat_template(), "");
  EXPECT_THAT(Enc(**tok, "x", true), ElementsAre('x'));
  // lstrip + rstrip: the token absorbs the whitespace around it.
  EXPECT_THAT(Enc(**tok, "a  <mask>\t b"), ElementsAre('a', 301, 'b'));
  // single_word: only between non-word characters.
  EXPECT_THAT(Enc(**tok, "x<w>y"), ElementsAre('x', '<', 'w', '>', 'y'));
  EXPECT_THAT(Enc(**tok, "x <w>."), ElementsAre('x', ' ', 302, '.'));
  EXPECT_THAT(Enc(**tok, "<w>"), ElementsAre(302));
  // Longest match wins among added tokens; special ones are skippable.
  EXPECT_THAT(Enc(**tok, "<s></s>"), ElementsAre(300, 303));
  EXPECT_EQ(Dec(**tok, {300, 259, 301, 302, 303}, /*skip=*/true), "hello<w>");
}

TEST_F(SyntheticTest, SplitBehaviors) {
  struct Case {
    const char* behavior;
    bool invert;
    std::vector<int32_t> expected;  // For "a-b--c".
  };
  const std::vector<Case> cases = {
      {"Isolated", false, {'a', '-', 'b', '-', '-', 'c'}},
      {"Removed", false, {'a', 'b', 'c'}},
      {"Removed", true, {'-', '-', '-'}},
      {"Contiguous", false, {'a', '-', 'b', 261, 'c'}},
      {"MergedWithPrevious", false, {262, 'b', '-', '-', 'c'}},
      {"MergedWithNext", false, {'a', 263, '-', '-', 'c'}},
  };
  for (const Case& c : cases) {
    const Json pre = {{"type", "Sequence"},
                      {"pretokenizers", Json::array({{{"type", "Split"},
                                                      {"pattern", {{"String", "-"}}},
                                                      {"behavior", c.behavior},
                                                      {"invert", c.invert}},
                                                     ByteLevelPreTokenizer(false)})}};
    auto tok = Load(SyntheticTokenizerJson(pre));
    ASSERT_TRUE(tok.ok()) << tok.status();
    EXPECT_EQ(Enc(**tok, "a-b--c"), c.expected) << c.behavior << " invert=" << c.invert;
  }
  // Without any split, the whole text is one BPE word.
  auto tok = Load(SyntheticTokenizerJson(ByteLevelPreTokenizer(false)));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT(Enc(**tok, "a-b"), ElementsAre(262, 'b'));
}

// tokenizer.json or tokenizer_config.json as a FIFO or directory: an error naming the file at
// once (a FIFO would otherwise block the loader until something writes to it).
TEST_F(SyntheticTest, NonRegularFilesAreRefusedWithoutBlocking) {
  const Json good = SyntheticTokenizerJson(ByteLevelPreTokenizer(true));
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    for (bool fifo : {true, false}) {
      Write("tokenizer.json", good.dump());
      std::filesystem::remove_all(dir_ / "tokenizer_config.json");
      const std::string path = (dir_ / name).string();
      if (fifo) {
        ::splitmoe::testing::MakeFifo(path);
      } else {
        ::splitmoe::testing::MakeDirectory(path);
      }
      absl::Status s = ::splitmoe::testing::RunWithDeadline(
          [&] { return Tokenizer::LoadFromDir(dir_.string()).status(); }, {path});
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_THAT(s.message(), HasSubstr(path));
      EXPECT_THAT(s.message(), HasSubstr(fifo ? "not a regular file (a FIFO)"
                                              : "not a regular file (a directory)"));
      std::filesystem::remove_all(path);
    }
  }
}

TEST_F(SyntheticTest, LoadErrorsNameTheFile) {
  auto missing = Tokenizer::LoadFromDir((dir_ / "nope").string());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope/tokenizer.json"));

  Write("tokenizer.json", "{\"model\": [1, 2");
  auto corrupt = Tokenizer::LoadFromDir(dir_.string());
  EXPECT_EQ(corrupt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(corrupt.status().message(), HasSubstr("tokenizer.json"));

  Json wrong_type = SyntheticTokenizerJson(ByteLevelPreTokenizer(true));
  wrong_type["model"]["vocab"]["he"] = "not a number";
  auto bad_vocab = Load(wrong_type);
  EXPECT_EQ(bad_vocab.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_vocab.status().message(), HasSubstr("tokenizer.json"));

  // Ids that are not integers in [0, 2^31) are refused naming the token (a float such as 2.5e48
  // was converted to an int32 without a word, UB found by tokenizer_load_fuzz).
  for (const Json& id : {Json(2.5e48), Json(7.5), Json(-1), Json(int64_t{1} << 31),
                         Json(uint64_t{1} << 63)}) {
    Json bad_id = SyntheticTokenizerJson(ByteLevelPreTokenizer(true));
    bad_id["model"]["vocab"]["hello"] = id;
    auto vocab_id = Load(bad_id);
    EXPECT_EQ(vocab_id.status().code(), absl::StatusCode::kInvalidArgument) << id.dump();
    EXPECT_THAT(vocab_id.status().message(), HasSubstr("vocab token \"hello\" has id"));
    bad_id = SyntheticTokenizerJson(ByteLevelPreTokenizer(true));
    bad_id["added_tokens"][0]["id"] = id;
    auto added_id = Load(bad_id);
    EXPECT_EQ(added_id.status().code(), absl::StatusCode::kInvalidArgument) << id.dump();
    EXPECT_THAT(added_id.status().message(), HasSubstr("added token \"<s>\" has id"));
  }

  Json nfc = SyntheticTokenizerJson(ByteLevelPreTokenizer(true));
  nfc["normalizer"] = {{"type", "NFC"}};
  auto unsupported = Load(nfc);
  EXPECT_EQ(unsupported.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(unsupported.status().message(), HasSubstr("NFC"));

  Json bad_merge = SyntheticTokenizerJson(ByteLevelPreTokenizer(true));
  bad_merge["model"]["merges"].push_back("x yz");
  EXPECT_EQ(Load(bad_merge).status().code(), absl::StatusCode::kInvalidArgument);

  Json bad_regex =
      SyntheticTokenizerJson({{"type", "Sequence"},
                              {"pretokenizers", Json::array({{{"type", "Split"},
                                                              {"pattern", {{"Regex", "(unclosed"}}},
                                                              {"behavior", "Isolated"},
                                                              {"invert", false}},
                                                             ByteLevelPreTokenizer(false)})}});
  auto regex_error = Load(bad_regex);
  EXPECT_EQ(regex_error.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(regex_error.status().message(), HasSubstr("(unclosed"));

  const Json bad_config = {{"bos_token", "<nope>"}, {"add_bos_token", true}};
  auto config_error = Load(SyntheticTokenizerJson(ByteLevelPreTokenizer(true)), &bad_config);
  EXPECT_EQ(config_error.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config_error.status().message(), HasSubstr("tokenizer_config.json"));

  Write("tokenizer_config.json", "not json");
  auto config_corrupt = Tokenizer::LoadFromDir(dir_.string());
  EXPECT_EQ(config_corrupt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config_corrupt.status().message(), HasSubstr("tokenizer_config.json"));
}

}  // namespace
}  // namespace splitmoe::tokenizer
