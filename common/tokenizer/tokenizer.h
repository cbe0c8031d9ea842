// The text <-> token-id layer of splitmoe: a C++ implementation of the HF `tokenizers` pipeline
// used by DeepSeek-V3 (byte-level BPE), loaded from a model directory's tokenizer.json and
// tokenizer_config.json, plus streaming detokenization for generated tokens.
//
// What is implemented is exactly what DeepSeek-V3-style tokenizer.json files use, with HF's
// semantics: added tokens (split out first, leftmost-longest, honouring lstrip / rstrip /
// single_word / normalized), an empty or absent normalizer, a pre_tokenizer made of `Split`
// (regexes read from the file, compiled with PCRE2 with Unicode semantics) and `ByteLevel`
// steps, a BPE model ranked by its merges, and the ByteLevel decoder. Anything else in the file
// (another normalizer, model type, decoder, BPE dropout, ...) is refused at load with
// UnimplementedError rather than silently tokenized differently. tokenizer.json's
// post_processor is not used: BOS/EOS come from tokenizer_config.json's add_bos_token /
// add_eos_token, as HF transformers' LlamaTokenizerFast does.
//
// Thread safety: a Tokenizer is immutable after LoadFromDir() (its internal word cache is
// synchronised), so one instance may be shared by any number of threads. An
// IncrementalDetokenizer holds per-stream state: use one per generation stream, from one thread
// at a time; it must not outlive its Tokenizer.
//
// Example:
//   SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<tokenizer::Tokenizer> tok,
//                             tokenizer::Tokenizer::LoadFromDir("/models/DeepSeek-V3"));
//   SPLITMOE_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
//                             tok->Encode("Hello world", /*add_special_tokens=*/true));
//   // ids == {0, 19923, 2058}: BOS, "Hello", " world".
//   tokenizer::IncrementalDetokenizer detok(*tok, /*skip_special_tokens=*/true);
//   for (int32_t id : generated) {
//     SPLITMOE_ASSIGN_OR_RETURN(std::string piece, detok.Push(id));
//     Send(piece);  // Always complete UTF-8; never retracted later.
//   }
//   Send(detok.Finish());
#ifndef SPLITMOE_COMMON_TOKENIZER_TOKENIZER_H_
#define SPLITMOE_COMMON_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace splitmoe::tokenizer {

namespace internal {
class TokenizerImpl;
}  // namespace internal

// Bounds on the files LoadFromDir reads (DeepSeek-V3's tokenizer.json is ~8 MB, its
// tokenizer_config.json a few KiB with the chat template).
inline constexpr uint64_t kMaxTokenizerJsonBytes = 128 << 20;
inline constexpr uint64_t kMaxTokenizerConfigJsonBytes = 16 << 20;

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and, if present, DIR/tokenizer_config.json (bos_token, eos_token,
  // add_bos_token, add_eos_token, chat_template). Errors name the offending file. Each must be
  // a regular file within the bounds above: a FIFO, directory or device is refused, never
  // waited on.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromDir(absl::string_view dir);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Encodes `text` (which must be valid UTF-8, else InvalidArgumentError). Added tokens that
  // appear literally in the text (e.g. "<｜User｜>") become their ids. With add_special_tokens,
  // BOS is prepended when tokenizer_config.json says add_bos_token, and EOS appended when it
  // says add_eos_token.
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text,
                                              bool add_special_tokens) const;

  // Decodes `ids` to text. A negative id is an InvalidArgumentError naming it; an id with no
  // token (>= vocab_size(), or a gap) decodes to nothing, as in HF — model vocabularies are
  // padded past the tokenizer's (DeepSeek-V3: 129280 vs 128815) and a model may sample there. skip_special_tokens drops added tokens marked special.
  // Byte sequences that do not form valid UTF-8 become U+FFFD, as in HF's decode.
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const;

  int32_t bos_id() const { return bos_id_; }  // -1 if tokenizer_config.json names none.
  int32_t eos_id() const { return eos_id_; }  // -1 if tokenizer_config.json names none.
  // Number of ids: base vocabulary plus added tokens, i.e. the largest id + 1.
  int32_t vocab_size() const;
  // tokenizer_config.json's chat_template (its "default" entry when it is a list); empty if none.
  const std::string& chat_template() const { return chat_template_; }
  // The token's string as stored in tokenizer.json (byte-level form, e.g. "Ġworld"), or nullopt
  // for an id that is out of range or unassigned. For debugging and inspection.
  std::optional<std::string> TokenText(int32_t id) const;
  // Whether `id` is an added token marked special (what skip_special_tokens drops).
  bool IsSpecial(int32_t id) const;

 private:
  friend class IncrementalDetokenizer;

  Tokenizer();

  // Appends the bytes `id` decodes to (nothing if it is special and skip_special_tokens).
  absl::Status AppendTokenBytes(int32_t id, bool skip_special_tokens, std::string* out) const;

  std::unique_ptr<internal::TokenizerImpl> impl_;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  bool add_bos_token_ = false;
  bool add_eos_token_ = false;
  std::string chat_template_;
};

// Streaming detokenization for generated ids. Push() returns only text that is complete, valid
// UTF-8 and will not change whatever tokens follow (bytes of a character split across tokens are
// held back until it completes); Finish() flushes what is held (an incomplete character becomes
// U+FFFD) and resets the stream. The concatenation of every Push() result and Finish() equals
// Tokenizer::Decode() of the same ids.
class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens);

  // InvalidArgumentError (stream unchanged) for an id Decode() would refuse.
  absl::StatusOr<std::string> Push(int32_t id);
  std::string Finish();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;  // Bytes of an incomplete UTF-8 sequence (at most 3).
};

}  // namespace splitmoe::tokenizer

#endif  // SPLITMOE_COMMON_TOKENIZER_TOKENIZER_H_
