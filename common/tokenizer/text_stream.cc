#include "common/tokenizer/text_stream.h"

#include <algorithm>

namespace splitmoe::tokenizer {

TextStream::TextStream(const Tokenizer* tokenizer, std::vector<std::string> stop)
    : stop_(std::move(stop)) {
  if (tokenizer != nullptr) detok_.emplace(*tokenizer, /*skip_special_tokens=*/true);
  for (const std::string& s : stop_) max_stop_ = std::max(max_stop_, s.size());
}

absl::StatusOr<std::string> TextStream::Push(int32_t id, bool last, bool* stopped) {
  *stopped = false;
  if (stopped_ || !detok_) return std::string();
  absl::StatusOr<std::string> piece = detok_->Push(id);
  if (!piece.ok()) return piece.status();
  const size_t searched_from = emitted_;
  text_ += *piece;
  // The last token releases what the detokenizer held (an incomplete character becomes U+FFFD):
  // searched for stop strings like the rest (it could complete one).
  if (last) text_ += detok_->Finish();
  // A stop string can only start in the part not yet returned (it was held back otherwise).
  size_t cut = std::string::npos;
  for (const std::string& s : stop_) {
    const size_t at = text_.find(s, searched_from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    text_.resize(cut);
    stopped_ = *stopped = true;
    last = true;
  }
  size_t safe = text_.size();
  if (!last && max_stop_ > 0) {
    safe = safe >= max_stop_ - 1 ? safe - (max_stop_ - 1) : 0;
    // Never split a character: back up over UTF-8 continuation bytes.
    while (safe > emitted_ && safe < text_.size() &&
           (static_cast<unsigned char>(text_[safe]) & 0xC0) == 0x80) {
      --safe;
    }
  }
  safe = std::max(safe, emitted_);
  std::string out = text_.substr(emitted_, safe - emitted_);
  emitted_ = safe;
  return out;
}

}  // namespace splitmoe::tokenizer
