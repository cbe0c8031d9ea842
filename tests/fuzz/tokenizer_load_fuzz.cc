// Fuzzes loading a tokenizer from its files: the input is tokenizer.json, optionally followed by
// kConfigSeparator and tokenizer_config.json; both are written into a temporary directory and
// loaded with Tokenizer::LoadFromDir. A tokenizer that loads must then encode and decode a few
// fixed texts and the input itself without crashing, decode to valid UTF-8, and stream
// (IncrementalDetokenizer) to exactly what Decode returns.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace splitmoe::fuzz {
namespace {

// Between tokenizer.json and tokenizer_config.json in an input (never in a JSON text: a raw
// newline cannot occur inside a JSON string).
constexpr absl::string_view kConfigSeparator = "\n--tokenizer_config.json--\n";

void Exercise(const tokenizer::Tokenizer& tok, absl::string_view text) {
  for (bool special : {false, true}) {
    absl::StatusOr<std::vector<int32_t>> ids = tok.Encode(text, special);
    if (!ids.ok()) continue;  // invalid UTF-8, or a regex that gave up
    for (int32_t id : *ids) {
      FUZZ_CHECK(id >= 0 && id < tok.vocab_size(),
                 "Encode gave id " << id << " of " << tok.vocab_size());
      (void)tok.TokenText(id);
      (void)tok.IsSpecial(id);
    }
    for (bool skip : {false, true}) {
      absl::StatusOr<std::string> decoded = tok.Decode(*ids, skip);
      FUZZ_CHECK(decoded.ok(), "Decode of Encode's ids failed: " << decoded.status());
      FUZZ_CHECK(tokenizer::testing::IsValidUtf8(*decoded), "Decode gave invalid UTF-8");
      tokenizer::IncrementalDetokenizer detok(tok, skip);
      std::string streamed;
      for (int32_t id : *ids) {
        absl::StatusOr<std::string> piece = detok.Push(id);
        FUZZ_CHECK(piece.ok(), "Push(" << id << ") failed: " << piece.status());
        streamed += *piece;
      }
      streamed += detok.Finish();
      FUZZ_CHECK(streamed == *decoded, "streamed text differs from Decode");
    }
  }
}

}  // namespace
}  // namespace splitmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fuzz = splitmoe::fuzz;
  if (size > fuzz::kMaxInputBytes) return -1;
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t sep = input.find(fuzz::kConfigSeparator);
  const absl::string_view tokenizer_json = input.substr(0, sep);
  static const std::string dir = [] {
    std::string d = fuzz::TempDir() + "/tokenizer";
    std::filesystem::create_directories(d);
    return d;
  }();
  FUZZ_CHECK(fuzz::WriteFile(dir + "/tokenizer.json", tokenizer_json.data(), tokenizer_json.size()),
             "cannot write " << dir << "/tokenizer.json");
  const std::string config_path = dir + "/tokenizer_config.json";
  if (sep != absl::string_view::npos) {
    const absl::string_view config = input.substr(sep + fuzz::kConfigSeparator.size());
    FUZZ_CHECK(fuzz::WriteFile(config_path, config.data(), config.size()),
               "cannot write " << config_path);
  } else {
    std::remove(config_path.c_str());
  }

  absl::StatusOr<std::unique_ptr<splitmoe::tokenizer::Tokenizer>> tok =
      splitmoe::tokenizer::Tokenizer::LoadFromDir(dir);
  if (!tok.ok()) {
    FUZZ_CHECK(!tok.status().message().empty(), "an error without a message");
    return 0;
  }
  const splitmoe::tokenizer::Tokenizer& t = **tok;
  FUZZ_CHECK(t.bos_id() >= -1 && t.bos_id() < t.vocab_size(), "bos_id " << t.bos_id());
  FUZZ_CHECK(t.eos_id() >= -1 && t.eos_id() < t.vocab_size(), "eos_id " << t.eos_id());
  for (absl::string_view text :
       {absl::string_view("Hello world"), absl::string_view("a  <mask>\t b <s>x</s>  "),
        absl::string_view("1234567 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x8e\x89 \r\n\n x"),
        absl::string_view("")}) {
    fuzz::Exercise(t, text);
  }
  fuzz::Exercise(t, tokenizer_json.substr(0, 256));
  return 0;
}
