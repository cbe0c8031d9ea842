#include "common/chat/chat_template.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

namespace splitmoe::chat {
namespace {

using Json = nlohmann::ordered_json;

const char* JsonTypeName(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "a boolean";
    case Json::value_t::string:
      return "a string";
    case Json::value_t::array:
      return "an array";
    case Json::value_t::object:
      return "an object";
    default:
      return "a number";
  }
}

absl::Status Invalid(absl::string_view where, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
}

// Joins the text parts of an OpenAI content array with "\n", as vLLM does.
absl::StatusOr<std::string> JoinTextParts(const Json& parts, const std::string& where) {
  std::string text;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Json& part = parts[i];
    const std::string at = absl::StrCat(where, "[", i, "]");
    if (!part.is_object()) {
      return Invalid(at,
                     absl::StrCat("a content part must be an object, got ", JsonTypeName(part)));
    }
    auto type = part.find("type");
    if (type == part.end() || !type->is_string()) {
      return Invalid(at, "a content part needs a string \"type\"");
    }
    if (*type != "text") {
      return Invalid(at, absl::StrCat("content part type '", type->get<std::string>(),
                                      "' is not supported (only \"text\")"));
    }
    auto t = part.find("text");
    if (t == part.end() || !t->is_string()) {
      return Invalid(at, "a text part needs a string \"text\"");
    }
    if (i > 0) text += "\n";
    text += t->get_ref<const std::string&>();
  }
  return text;
}

}  // namespace

absl::StatusOr<Json> NormalizeChatMessages(const Json& messages) {
  if (!messages.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("messages must be an array, got ", JsonTypeName(messages)));
  }
  Json out = Json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string where = absl::StrCat("messages[", i, "]");
    const Json& m = messages[i];
    if (!m.is_object()) {
      return Invalid(where, absl::StrCat("a message must be an object, got ", JsonTypeName(m)));
    }
    auto role = m.find("role");
    if (role == m.end()) return Invalid(where, "a message needs a \"role\"");
    if (!role->is_string()) {
      return Invalid(where, absl::StrCat("\"role\" must be a string, got ", JsonTypeName(*role)));
    }
    Json message = m;
    auto content = m.find("content");
    if (content == m.end()) {
      message["content"] = nullptr;
    } else if (content->is_array()) {
      SPLITMOE_ASSIGN_OR_RETURN(std::string text,
                                JoinTextParts(*content, absl::StrCat(where, ".content")));
      message["content"] = std::move(text);
    } else if (!content->is_string() && !content->is_null()) {
      return Invalid(where, absl::StrCat("\"content\" must be a string, null or an array of "
                                         "text parts, got ",
                                         JsonTypeName(*content)));
    }
    auto tool_calls = m.find("tool_calls");
    if (tool_calls != m.end() && !tool_calls->is_null()) {
      if (!tool_calls->is_array()) {
        return Invalid(where, absl::StrCat("\"tool_calls\" must be an array, got ",
                                           JsonTypeName(*tool_calls)));
      }
      for (size_t k = 0; k < tool_calls->size(); ++k) {
        const Json& call = (*tool_calls)[k];
        const std::string at = absl::StrCat(where, ".tool_calls[", k, "]");
        if (!call.is_object()) return Invalid(at, "a tool call must be an object");
        auto function = call.find("function");
        if (function == call.end() || !function->is_object()) {
          return Invalid(at, "a tool call needs a \"function\" object");
        }
        auto name = function->find("name");
        if (name == function->end() || !name->is_string()) {
          return Invalid(at, "a tool call's function needs a string \"name\"");
        }
      }
    }
    for (const char* key : {"tool_call_id", "name"}) {
      auto v = m.find(key);
      if (v != m.end() && !v->is_string() && !v->is_null()) {
        return Invalid(where,
                       absl::StrCat("\"", key, "\" must be a string, got ", JsonTypeName(*v)));
      }
    }
    out.push_back(std::move(message));
  }
  return out;
}

absl::StatusOr<Json> ChatTemplateContext(const Json& messages, const ChatRenderOptions& options) {
  SPLITMOE_ASSIGN_OR_RETURN(Json normalized, NormalizeChatMessages(messages));
  if (!options.tools.is_null() && !options.tools.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tools must be null or an array, got ", JsonTypeName(options.tools)));
  }
  if (!options.extra.is_null() && !options.extra.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "extra template variables must be null or an object, got ", JsonTypeName(options.extra)));
  }
  Json context = Json::object();
  context["messages"] = std::move(normalized);
  context["add_generation_prompt"] = options.add_generation_prompt;
  context["bos_token"] = options.bos_token;
  context["eos_token"] = options.eos_token;
  context["tools"] = options.tools;
  if (options.extra.is_object()) {
    for (auto it = options.extra.begin(); it != options.extra.end(); ++it) {
      if (context.contains(it.key())) {
        return absl::InvalidArgumentError(absl::StrCat("extra template variable '", it.key(),
                                                       "' conflicts with a chat variable"));
      }
      context[it.key()] = it.value();
    }
  }
  return context;
}

absl::StatusOr<std::string> RenderChat(const JinjaTemplate& chat_template, const Json& messages,
                                       const ChatRenderOptions& options) {
  SPLITMOE_ASSIGN_OR_RETURN(Json context, ChatTemplateContext(messages, options));
  return chat_template.Render(context, options.limits);
}

absl::StatusOr<std::string> RenderChat(const std::string& chat_template, const Json& messages,
                                       const ChatRenderOptions& options) {
  absl::StatusOr<JinjaTemplate> parsed = JinjaTemplate::Parse(chat_template);
  if (!parsed.ok()) return Annotate(parsed.status(), "parsing the chat template");
  return RenderChat(*parsed, messages, options);
}

absl::StatusOr<std::string> RenderChat(const std::string& chat_template,
                                       const nlohmann::json& messages,
                                       const ChatRenderOptions& options) {
  return RenderChat(chat_template, Json(messages), options);
}

}  // namespace splitmoe::chat
