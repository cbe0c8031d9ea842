// The model fingerprint: the same files give the same fingerprint wherever they lie; another
// config, tokenizer or weights layout gives another; a FIFO in the directory is an error at
// once, never a hang.
#include "common/rpc/rpc.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "tests/testing/special_files.h"
#include "tests/testing/test_models.h"

namespace splitmoe::rpc {
namespace {

namespace fs = std::filesystem;

std::string Fingerprint(const std::string& dir) {
  absl::StatusOr<std::string> f = ModelFingerprint(dir);
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? *f : "";
}

std::string Copy(const std::string& src, const std::string& name) {
  const std::string dst = testing::TempDir(name);
  fs::copy(src, dst, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  return dst;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

std::string Bf16Model() {
  return testing::TinyModel("fp_bf16", [](model::TinyModelOptions& o) { o.mtp_layers = 0; });
}

TEST(ModelFingerprintTest, SameFilesGiveTheSameFingerprintAnywhere) {
  const std::string a = Bf16Model();
  const std::string b = Copy(a, "fp_copy");
  const std::string fa = Fingerprint(a);
  EXPECT_EQ(fa.size(), 32u) << fa;
  EXPECT_EQ(fa.find_first_not_of("0123456789abcdef"), std::string::npos) << fa;
  EXPECT_EQ(fa, Fingerprint(b));
  EXPECT_EQ(fa, Fingerprint(a));
}

// Same config.json, other weights: BF16 against FP8 (other dtypes and scale tensors in the
// headers), one file against shards.
TEST(ModelFingerprintTest, SameConfigOtherWeightsDiffer) {
  const std::string bf16 = Bf16Model();
  const std::string fp8 = testing::TinyModel("fp_fp8", [](model::TinyModelOptions& o) {
    o.mtp_layers = 0;
    o.fp8 = true;
  });
  const std::string sharded = testing::TinyModel("fp_sharded", [](model::TinyModelOptions& o) {
    o.mtp_layers = 0;
    o.shards = 2;
  });
  ASSERT_EQ(ReadBytes(bf16 + "/config.json"), ReadBytes(fp8 + "/config.json"));
  ASSERT_EQ(ReadBytes(bf16 + "/config.json"), ReadBytes(sharded + "/config.json"));
  EXPECT_NE(Fingerprint(bf16), Fingerprint(fp8));
  EXPECT_NE(Fingerprint(bf16), Fingerprint(sharded));
  EXPECT_NE(Fingerprint(fp8), Fingerprint(sharded));
  // A shard's header changed in place, its size kept (one byte of the JSON header).
  const std::string edited = Copy(sharded, "fp_edited");
  const std::string shard = edited + "/model-00002-of-00002.safetensors";
  std::string bytes = ReadBytes(shard);
  const size_t at = bytes.find("\"pt\"");  // __metadata__ {"format": "pt"}
  ASSERT_NE(at, std::string::npos);
  bytes[at + 2] = 'u';  // "pu": same length, same data
  std::ofstream(shard, std::ios::binary | std::ios::trunc) << bytes;
  EXPECT_NE(Fingerprint(sharded), Fingerprint(edited));
}

TEST(ModelFingerprintTest, ConfigAndTokenizerFilesCount) {
  const std::string base = Bf16Model();
  const std::string fb = Fingerprint(base);
  const std::string with_config = Copy(base, "fp_tok_config");
  std::ofstream(with_config + "/tokenizer_config.json") << R"({"add_bos_token": true})";
  EXPECT_NE(Fingerprint(with_config), fb);
  const std::string other_config = Copy(with_config, "fp_tok_config2");
  std::ofstream(other_config + "/tokenizer_config.json", std::ios::trunc)
      << R"({"add_bos_token": false})";
  EXPECT_NE(Fingerprint(other_config), Fingerprint(with_config));
  const std::string with_tokenizer = Copy(base, "fp_tok");
  std::ofstream(with_tokenizer + "/tokenizer.json") << "{}";
  EXPECT_NE(Fingerprint(with_tokenizer), fb);
  const std::string spaced = Copy(base, "fp_config");
  std::ofstream(spaced + "/config.json", std::ios::app) << " ";
  EXPECT_NE(Fingerprint(spaced), fb);
}

TEST(ModelFingerprintTest, NonRegularFilesAreErrorsNotHangs) {
  const std::string base = Bf16Model();
  for (const char* name : {"config.json", "tokenizer.json", "tokenizer_config.json",
                           "model.safetensors.index.json", "model.safetensors"}) {
    const std::string dir = Copy(base, std::string("fp_fifo_") + name);
    const std::string path = dir + "/" + name;
    testing::MakeFifo(path);
    absl::Status s =
        testing::RunWithDeadline([&] { return ModelFingerprint(dir).status(); }, {path});
    ASSERT_FALSE(s.ok()) << name;
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(path + ": not a regular file (a FIFO)"), std::string::npos) << s;
  }
  EXPECT_EQ(ModelFingerprint("/nonexistent/model").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace splitmoe::rpc
