// The Jinja parser of the renderer (jinja.h): @huggingface/jinja's recursive-descent parser,
// ported rule for rule (its operator precedence, its leniencies such as list items without
// commas, and its refusals) so that a template parses here exactly when it parses there. Nesting
// is bounded (kMaxParseDepth, kMaxAstDepth) so that no input overflows the stack. Pure; any
// thread.
//
//   absl::StatusOr<std::unique_ptr<Node>> program = Parse(*Tokenize(source));
#ifndef SPLITMOE_COMMON_CHAT_INTERNAL_PARSER_H_
#define SPLITMOE_COMMON_CHAT_INTERNAL_PARSER_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/chat/internal/ast.h"
#include "common/chat/internal/lexer.h"

namespace splitmoe::chat::internal {

inline constexpr int kMaxParseDepth = 200;  // nested blocks and sub-expressions
inline constexpr int kMaxAstDepth = 400;    // height of any syntax tree

// Parses `tokens` into a kProgram node. Errors name the line and column.
absl::StatusOr<std::unique_ptr<Node>> Parse(const std::vector<Token>& tokens);

}  // namespace splitmoe::chat::internal

#endif  // SPLITMOE_COMMON_CHAT_INTERNAL_PARSER_H_
