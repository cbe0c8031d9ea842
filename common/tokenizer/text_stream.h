// TextStream: the text side of one generation stream — incremental detokenization plus stop
// strings, shared by the single-process engine and the router so both produce the same text.
// Push() returns the text that became final with a token: complete UTF-8, never retracted, never
// part of a stop string. A tail that could still grow into a stop string (up to the longest stop
// string minus one byte, extended back to a character boundary) is held until it cannot, or
// until the last token. When a stop string appears, the text ends right before its first
// occurrence and `stopped` is set. One stream per generation; not thread-safe.
//
//   TextStream text(tokenizer, {"\n\n"});
//   for (int32_t id : generated) {
//     bool stopped = false;
//     SPLITMOE_ASSIGN_OR_RETURN(std::string piece, text.Push(id, /*last=*/..., &stopped));
//     Send(piece);
//     if (stopped) break;
//   }
#ifndef SPLITMOE_COMMON_TOKENIZER_TEXT_STREAM_H_
#define SPLITMOE_COMMON_TOKENIZER_TEXT_STREAM_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer/tokenizer.h"

namespace splitmoe::tokenizer {

class TextStream {
 public:
  // `tokenizer` may be null (no text; stop strings then never match). Special tokens are skipped.
  TextStream(const Tokenizer* tokenizer, std::vector<std::string> stop);

  // Text that became final with `id`. `last`: no token follows (everything held is released).
  absl::StatusOr<std::string> Push(int32_t id, bool last, bool* stopped);

  // Everything decoded so far: what Push() returned, then a tail still held back (empty once
  // the last token or a stop string ended the stream).
  const std::string& text() const { return text_; }

 private:
  std::optional<IncrementalDetokenizer> detok_;
  std::vector<std::string> stop_;
  size_t max_stop_ = 0;
  std::string text_;      // everything decoded (ends at a stop string once stopped)
  size_t emitted_ = 0;    // bytes of text_ returned
  bool stopped_ = false;
};

}  // namespace splitmoe::tokenizer

#endif  // SPLITMOE_COMMON_TOKENIZER_TEXT_STREAM_H_
