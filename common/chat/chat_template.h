// Renders an OpenAI-style conversation through a model's chat template (jinja.h), as HF
// transformers' apply_chat_template does: the template sees `messages`, `add_generation_prompt`,
// `bos_token`, `eos_token`, `tools` (null when absent) and any extra variables. Messages are
// validated and normalized first: a content given as an array of {"type": "text", "text": ...}
// parts becomes one string joined with "\n" (as vLLM does), and a missing content becomes null
// (an assistant turn with only tool_calls). Other members (tool_calls, tool_call_id, name, ...)
// pass through unchanged. Pure functions; any thread.
//
//   ChatRenderOptions options;
//   options.bos_token = "<｜begin▁of▁sentence｜>";
//   absl::StatusOr<std::string> prompt = RenderChat(
//       chat_template, nlohmann::ordered_json::parse(R"([{"role": "user", "content": "Hi"}])"),
//       options);  // "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
//
// Prefer the nlohmann::ordered_json overloads for requests: nlohmann::json sorts object keys, and
// templates print tool schemas with `tojson` in their key order.
#ifndef SPLITMOE_COMMON_CHAT_CHAT_TEMPLATE_H_
#define SPLITMOE_COMMON_CHAT_CHAT_TEMPLATE_H_

#include <string>

#include "absl/status/statusor.h"
#include "common/chat/jinja.h"
#include "nlohmann/json.hpp"

namespace splitmoe::chat {

struct ChatRenderOptions {
  bool add_generation_prompt = true;
  std::string bos_token;  // the tokenizer's BOS text, e.g. "<｜begin▁of▁sentence｜>"
  std::string eos_token;
  nlohmann::ordered_json tools;  // null, or the OpenAI "tools" array, passed as `tools`
  nlohmann::ordered_json extra;  // extra template variables (an object) or null
  JinjaLimits limits;
};

// Validates `messages` (an array of objects with a string role; content a string, null, absent
// or an array of text parts; tool_calls null or an array of objects) and returns them
// normalized. InvalidArgument names the offending message ("messages[2].content[0]: ...").
absl::StatusOr<nlohmann::ordered_json> NormalizeChatMessages(
    const nlohmann::ordered_json& messages);

// The template's variables for `messages` (validated and normalized) and `options`.
absl::StatusOr<nlohmann::ordered_json> ChatTemplateContext(const nlohmann::ordered_json& messages,
                                                           const ChatRenderOptions& options);

// Renders a conversation (OpenAI-style messages array) through `chat_template`.
absl::StatusOr<std::string> RenderChat(const std::string& chat_template,
                                       const nlohmann::json& messages,
                                       const ChatRenderOptions& options);
absl::StatusOr<std::string> RenderChat(const std::string& chat_template,
                                       const nlohmann::ordered_json& messages,
                                       const ChatRenderOptions& options);
// The same with a template parsed once (e.g. at model load).
absl::StatusOr<std::string> RenderChat(const JinjaTemplate& chat_template,
                                       const nlohmann::ordered_json& messages,
                                       const ChatRenderOptions& options);

}  // namespace splitmoe::chat

#endif  // SPLITMOE_COMMON_CHAT_CHAT_TEMPLATE_H_
