// The Jinja interpreter of the renderer (jinja.h): evaluates a parsed template as
// @huggingface/jinja's Interpreter does (its scoping, truthiness, operators, filters, tests and
// methods, and its refusals), within JinjaLimits. One call renders once; the tree is only read,
// so one template may render on many threads at once.
//
//   absl::StatusOr<std::string> text = RenderProgram(*program, *FromJson(context), limits);
#ifndef SPLITMOE_COMMON_CHAT_INTERNAL_INTERPRETER_H_
#define SPLITMOE_COMMON_CHAT_INTERNAL_INTERPRETER_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/chat/internal/ast.h"
#include "common/chat/internal/value.h"
#include "common/chat/jinja_limits.h"

namespace splitmoe::chat::internal {

// Renders `program` (a kProgram node) with the members of `context` (an object, or null for
// none) as variables.
absl::StatusOr<std::string> RenderProgram(const Node& program, const Value& context,
                                          const JinjaLimits& limits);

// Marks a status as raised by the template's raise_exception(); see IsRaisedException.
inline constexpr char kRaisedPayload[] = "splitmoe.chat/raise_exception";

}  // namespace splitmoe::chat::internal

#endif  // SPLITMOE_COMMON_CHAT_INTERNAL_INTERPRETER_H_
