// TextStream (detokenisation + stop strings, shared by the engine and the router) on the real
// DeepSeek-V3 tokenizer: without stop strings the pieces concatenate to Decode(); a stop string
// ends the text right before its first occurrence even when it spans tokens, and no byte of it
// is ever returned; held-back tails never split a UTF-8 character.
#include "common/tokenizer/text_stream.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace splitmoe::tokenizer {
namespace {

bool ValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (int k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

class TextStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tok = Tokenizer::LoadFromDir(testing::TokenizerDir());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(*tok);
  }
  // Streams `text`'s tokens; returns the pieces and whether/where it stopped.
  std::vector<std::string> Stream(const std::string& text, std::vector<std::string> stop,
                                  bool* stopped, size_t* tokens_used) {
    auto ids = tok_->Encode(text, false);
    EXPECT_TRUE(ids.ok());
    TextStream stream(tok_.get(), std::move(stop));
    std::vector<std::string> pieces;
    *stopped = false;
    *tokens_used = 0;
    for (size_t i = 0; i < ids->size(); ++i) {
      auto piece = stream.Push((*ids)[i], i + 1 == ids->size(), stopped);
      EXPECT_TRUE(piece.ok());
      pieces.push_back(*piece);
      *tokens_used = i + 1;
      if (*stopped) break;
    }
    return pieces;
  }
  std::unique_ptr<Tokenizer> tok_;
};

std::string Join(const std::vector<std::string>& pieces) {
  std::string out;
  for (const auto& p : pieces) out += p;
  return out;
}

TEST_F(TextStreamTest, WithoutStopStringsEqualsDecode) {
  const std::string text = "Hello, 世界! Ünïcödé and emoji 🎉 mixed in. 深度求索";
  bool stopped;
  size_t used;
  auto pieces = Stream(text, {}, &stopped, &used);
  EXPECT_FALSE(stopped);
  EXPECT_EQ(Join(pieces), text);
  for (const auto& p : pieces) EXPECT_TRUE(ValidUtf8(p)) << p;
}

TEST_F(TextStreamTest, StopsRightBeforeTheFirstStopStringAcrossTokens) {
  const std::string text = "The answer is forty-two. THE END of the story. THE END again";
  bool stopped;
  size_t used;
  auto pieces = Stream(text, {"story", "THE END"}, &stopped, &used);
  EXPECT_TRUE(stopped);
  EXPECT_EQ(Join(pieces), "The answer is forty-two. ");
  auto ids = tok_->Encode(text, false);
  EXPECT_LT(used, ids->size());  // it stopped as soon as the string appeared
}

TEST_F(TextStreamTest, HeldBackTailsNeverSplitACharacter) {
  const std::string text = "深度求索的模型很好用，我们来测试一下停止字符串的处理。结束了";
  bool stopped;
  size_t used;
  auto pieces = Stream(text, {"结束了吗", "xyzzy"}, &stopped, &used);
  EXPECT_FALSE(stopped);
  EXPECT_EQ(Join(pieces), text);
  for (const auto& p : pieces) EXPECT_TRUE(ValidUtf8(p)) << "piece split a character";
  // And a multi-byte stop string is found and cut cleanly.
  pieces = Stream(text, {"测试"}, &stopped, &used);
  EXPECT_TRUE(stopped);
  EXPECT_EQ(Join(pieces), "深度求索的模型很好用，我们来");
}

// The last token leaves an incomplete character, which the end of the stream releases as
// U+FFFD: a stop string it completes still ends the text (it was returned before; found by
// tokenizer_fuzz).
TEST_F(TextStreamTest, AStopStringCompletedByTheReleasedTailStillStops) {
  const std::string replacement = "\xef\xbf\xbd";
  // A token that is the lead byte of a multi-byte character alone (byte-level BPE has one per
  // byte): the detokenizer holds it back, and only the end of the stream releases it, as U+FFFD.
  int32_t lone = -1;
  for (int32_t id = 0; id < tok_->vocab_size() && lone < 0; ++id) {
    IncrementalDetokenizer probe(*tok_, /*skip_special_tokens=*/true);
    auto piece = probe.Push(id);
    if (piece.ok() && piece->empty() && probe.Finish() == replacement) lone = id;
  }
  ASSERT_GE(lone, 0);
  auto ids = tok_->Encode("land", false);
  ASSERT_TRUE(ids.ok());
  std::vector<int32_t> all(ids->begin(), ids->end());
  all.push_back(lone);
  TextStream stream(tok_.get(), {"land" + replacement});
  bool stopped = false;
  std::string text;
  for (size_t i = 0; i < all.size() && !stopped; ++i) {
    auto piece = stream.Push(all[i], i + 1 == all.size(), &stopped);
    ASSERT_TRUE(piece.ok()) << piece.status();
    text += *piece;
  }
  EXPECT_TRUE(stopped) << "the stop string completed by the released tail was missed";
  EXPECT_EQ(text, "");
  EXPECT_EQ(stream.text(), "");
}

TEST_F(TextStreamTest, NoTokenizerMeansNoText) {
  TextStream stream(nullptr, {"a"});
  bool stopped = true;
  auto piece = stream.Push(5, true, &stopped);
  ASSERT_TRUE(piece.ok());
  EXPECT_EQ(*piece, "");
  EXPECT_FALSE(stopped);
}

}  // namespace
}  // namespace splitmoe::tokenizer
