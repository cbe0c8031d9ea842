#include "common/chat/jinja.h"

#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/chat/internal/ast.h"
#include "common/chat/internal/interpreter.h"
#include "common/chat/internal/lexer.h"
#include "common/chat/internal/parser.h"
#include "common/chat/internal/value.h"

namespace splitmoe::chat {

absl::StatusOr<JinjaTemplate> JinjaTemplate::Parse(std::string_view source) {
  absl::StatusOr<std::vector<internal::Token>> tokens =
      internal::Tokenize(absl::string_view(source.data(), source.size()));
  if (!tokens.ok()) return tokens.status();
  absl::StatusOr<std::unique_ptr<internal::Node>> program = internal::Parse(*tokens);
  if (!program.ok()) return program.status();
  return JinjaTemplate(std::shared_ptr<const internal::Node>(*std::move(program)));
}

absl::StatusOr<std::string> JinjaTemplate::Render(const nlohmann::json& context,
                                                  const JinjaLimits& limits) const {
  absl::StatusOr<internal::Value> value = internal::FromJson(context);
  if (!value.ok()) return value.status();
  return internal::RenderProgram(*program_, *value, limits);
}

absl::StatusOr<std::string> JinjaTemplate::Render(const nlohmann::ordered_json& context,
                                                  const JinjaLimits& limits) const {
  absl::StatusOr<internal::Value> value = internal::FromJson(context);
  if (!value.ok()) return value.status();
  return internal::RenderProgram(*program_, *value, limits);
}

bool IsRaisedException(const absl::Status& status) {
  return status.GetPayload(internal::kRaisedPayload).has_value();
}

}  // namespace splitmoe::chat
