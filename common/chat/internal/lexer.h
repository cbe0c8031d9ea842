// The Jinja lexer of the renderer (jinja.h): @huggingface/jinja's preprocessing and tokenizer,
// ported step for step so that whitespace handling is byte-identical. Preprocessing, as HF
// transformers configures Jinja for chat templates: one trailing newline dropped, lstrip_blocks
// (spaces and tabs before `{%`, `{#` or `{-` at the start of a line removed), trim_blocks (the
// newline after `%}`, `#}` or `-}` removed), and transformers' `{% generation %}` /
// `{% endgeneration %}` tags removed. Then `{{-`, `-}}`, `{%-`, `-%}`, `{#-`, `-#}` strip the
// whitespace on their side. Tokens carry their line and column (1-based, in code points) in the
// original source. Pure; any thread.
//
//   absl::StatusOr<std::vector<Token>> tokens = Tokenize("Hello {{ name }}!");
#ifndef SPLITMOE_COMMON_CHAT_INTERNAL_LEXER_H_
#define SPLITMOE_COMMON_CHAT_INTERNAL_LEXER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace splitmoe::chat::internal {

enum class TokenType {
  kText,
  kNumericLiteral,
  kStringLiteral,
  kIdentifier,
  kEquals,
  kOpenParen,
  kCloseParen,
  kOpenStatement,
  kCloseStatement,
  kOpenExpression,
  kCloseExpression,
  kOpenSquareBracket,
  kCloseSquareBracket,
  kOpenCurlyBracket,
  kCloseCurlyBracket,
  kComma,
  kDot,
  kColon,
  kPipe,
  kAdditiveBinaryOperator,        // + - ~
  kMultiplicativeBinaryOperator,  // * / // %
  kExponentiationBinaryOperator,  // **
  kComparisonBinaryOperator,      // < > <= >= == !=
  kUnaryOperator,                 // + - (before an operand)
  kComment,
};

// @huggingface/jinja's name of a token type ("OpenStatement"), for messages.
const char* TokenTypeName(TokenType type);

struct Token {
  TokenType type;
  std::string value;  // the text, the literal's value (escapes resolved), the name or operator
  int line = 0;
  int column = 0;
};

// The largest template accepted, in bytes.
inline constexpr size_t kMaxTemplateBytes = 8 << 20;

// Tokenizes `source` (valid UTF-8). Errors name the line and column.
absl::StatusOr<std::vector<Token>> Tokenize(absl::string_view source);

}  // namespace splitmoe::chat::internal

#endif  // SPLITMOE_COMMON_CHAT_INTERNAL_LEXER_H_
