// The real DeepSeek-V3 tokenizer files are where the rest of splitmoe expects them
// (third_party/tokenizer/ under the source tree, put there by scripts/setup.sh) and load.
#include <filesystem>
#include <string>

#include "common/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace splitmoe::tokenizer {
namespace {

TEST(TokenizerLoadTest, LoadsThirdPartyTokenizer) {
  const std::string dir = testing::TokenizerDir();
  for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) {
    ASSERT_TRUE(std::filesystem::is_regular_file(std::filesystem::path(dir) / file))
        << dir << "/" << file << " is missing: run scripts/setup.sh";
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::LoadFromDir(dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 128815);
  EXPECT_EQ((*tok)->bos_id(), 0);
  EXPECT_EQ((*tok)->eos_id(), 1);
  EXPECT_FALSE((*tok)->chat_template().empty());
  absl::StatusOr<std::vector<int32_t>> ids = (*tok)->Encode("Hello world", true);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int32_t>{0, 19923, 2058}));
}

}  // namespace
}  // namespace splitmoe::tokenizer
