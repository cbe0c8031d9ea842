// Helpers shared by the tests: where the source and build trees are, and tiny checkpoints
// written once per test binary into a temporary directory.
//
//   std::string dir = testing::TinyModel("v3_fp8", [](model::TinyModelOptions& o) { o.fp8 = true;
//   });
#ifndef SPLITMOE_TESTS_TESTING_TEST_MODELS_H_
#define SPLITMOE_TESTS_TESTING_TEST_MODELS_H_

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>

#include "common/model/tiny.h"
#include "gtest/gtest.h"

namespace splitmoe::testing {

inline std::string SourceDir() {
  const char* dir = std::getenv("SPLITMOE_SOURCE_DIR");
  return dir ? dir : ".";
}

inline std::string TokenizerDir() { return SourceDir() + "/third_party/tokenizer"; }

// A fresh directory under the system temp dir, unique to this process.
inline std::string TempDir(const std::string& name) {
  std::filesystem::path p = std::filesystem::temp_directory_path() /
                            ("splitmoe_test_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// Writes (once per process) a tiny model with small defaults (vocab 512, no tokenizer) after
// `customize` adjusts the options.
inline std::string TinyModel(
    const std::string& name,
    const std::function<void(model::TinyModelOptions&)>& customize = nullptr,
    bool with_tokenizer = false) {
  std::filesystem::path p = std::filesystem::temp_directory_path() /
                            ("splitmoe_test_" + std::to_string(::getpid())) / ("model_" + name);
  if (std::filesystem::exists(p / "config.json")) return p.string();
  model::TinyModelOptions o;
  o.vocab_size = with_tokenizer ? 129280 : 512;
  if (customize) customize(o);
  absl::Status s = model::WriteTinyModel(o, p.string(), with_tokenizer ? TokenizerDir() : "");
  EXPECT_TRUE(s.ok()) << s;
  return p.string();
}

// Removes this process's temp tree; call from a test environment's TearDown.
class TempCleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    std::filesystem::remove_all(std::filesystem::temp_directory_path() /
                                ("splitmoe_test_" + std::to_string(::getpid())));
  }
};

}  // namespace splitmoe::testing

#define SPLITMOE_ASSERT_OK(expr)                  \
  do {                                            \
    const absl::Status splitmoe_s_ = (expr);      \
    ASSERT_TRUE(splitmoe_s_.ok()) << splitmoe_s_; \
  } while (0)

#endif  // SPLITMOE_TESTS_TESTING_TEST_MODELS_H_
