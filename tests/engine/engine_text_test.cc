// The engine with the real DeepSeek-V3 tokenizer: text prompts, streaming that never splits a
// UTF-8 sequence, and stop strings that are never half-emitted.
#include <string>

#include "common/engine/engine.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace splitmoe::engine {
namespace {

bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t j = 1; j < len; ++j) {
      if ((static_cast<unsigned char>(s[i + j]) >> 6) != 2) return false;
    }
    i += len;
  }
  return true;
}

class EngineTextTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string dir = testing::TinyModel("text", nullptr, /*with_tokenizer=*/true);
    auto e = Engine::Load(dir);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e).release();
  }
  static void TearDownTestSuite() { delete engine_; }
  static Engine* engine_;
};
Engine* EngineTextTest::engine_ = nullptr;

TEST_F(EngineTextTest, StreamedPiecesAreValidUtf8AndAddUpToTheText) {
  ASSERT_NE(engine_->tokenizer(), nullptr);
  for (uint64_t seed = 0; seed < 4; ++seed) {
    GenerateRequest req;
    auto prompt = engine_->tokenizer()->Encode("日本語のテキスト 🙂 and English", true);
    ASSERT_TRUE(prompt.ok());
    req.prompt = *prompt;
    req.max_tokens = 40;
    req.ignore_eos = true;
    req.sampling.temperature = 1.0;
    req.sampling.seed = seed;
    std::string streamed;
    auto out = engine_->Generate(req, [&](int32_t, absl::string_view piece) {
      EXPECT_TRUE(ValidUtf8(std::string(piece)));
      streamed.append(piece.data(), piece.size());
    });
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(streamed, out->text);
    EXPECT_TRUE(ValidUtf8(out->text));
    auto decoded = engine_->tokenizer()->Decode(out->tokens, true);
    ASSERT_TRUE(decoded.ok());
    EXPECT_EQ(*decoded, out->text);
  }
}

TEST_F(EngineTextTest, StopStringTruncatesTextAndIsNeverStreamed) {
  GenerateRequest req;
  req.prompt = *engine_->tokenizer()->Encode("The capital of France is", true);
  req.max_tokens = 30;
  req.ignore_eos = true;
  auto free_run = engine_->Generate(req, nullptr);
  ASSERT_TRUE(free_run.ok());
  ASSERT_GE(free_run->text.size(), 6u);
  // Stop on a piece of the greedy text that starts a few bytes in.
  const std::string stop = free_run->text.substr(3, 3);
  req.stop = {stop};
  std::string streamed;
  auto out = engine_->Generate(
      req, [&](int32_t, absl::string_view piece) { streamed.append(piece.data(), piece.size()); });
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->finish_reason, "stop");
  EXPECT_EQ(out->text, free_run->text.substr(0, free_run->text.find(stop)));
  EXPECT_EQ(streamed, out->text);
  EXPECT_EQ(streamed.find(stop), std::string::npos);
}

TEST_F(EngineTextTest, RefusesTokenizerLargerThanTheModel) {
  std::string dir = testing::TinyModel(
      "small_vocab_with_tokenizer", [](model::TinyModelOptions& o) { o.vocab_size = 1024; },
      /*with_tokenizer=*/true);
  auto e = Engine::Load(dir);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("vocab_size"), std::string::npos) << e.status();
}

}  // namespace
}  // namespace splitmoe::engine
