// The tokenizer's UTF-8 helpers are common/base/utf8.h (one implementation, shared with the
// router's request checks, the logger and the chat renderer); the tokenizer's code names them
// here.
#ifndef SPLITMOE_COMMON_TOKENIZER_INTERNAL_UTF8_H_
#define SPLITMOE_COMMON_TOKENIZER_INTERNAL_UTF8_H_

#include "common/base/utf8.h"

namespace splitmoe::tokenizer::internal {

using utf8::AppendCodePoint;
using utf8::AppendUtf8Lossy;
using utf8::DecodeCodePoint;
using utf8::FindInvalidUtf8;
using utf8::IsWhiteSpace;
using utf8::kAllValid;

}  // namespace splitmoe::tokenizer::internal

#endif  // SPLITMOE_COMMON_TOKENIZER_INTERNAL_UTF8_H_
