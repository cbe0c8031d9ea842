// jinja_render: the C++ counterpart of tools/chat-oracle/render.mjs, for comparing the two by
// hand. Reads JSON lines {"template": "...", "context": {...}} on stdin and prints one JSON line
// per input: {"ok": true, "text": "..."} or {"ok": false, "error": "..."}.
//
//   echo '{"template": "{{ x + 1 }}", "context": {"x": 1}}' | build-chat/tests/jinja_render
#include <iostream>
#include <string>

#include "common/chat/jinja.h"
#include "nlohmann/json.hpp"

int main() {
  using Json = nlohmann::ordered_json;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Json result;
    Json input = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (input.is_discarded() || !input.is_object() || !input.contains("template") ||
        !input["template"].is_string()) {
      result = {{"ok", false},
                {"error", "jinja_render: expected {\"template\": ..., \"context\": ...}"}};
    } else {
      absl::StatusOr<splitmoe::chat::JinjaTemplate> t =
          splitmoe::chat::JinjaTemplate::Parse(input["template"].get<std::string>());
      absl::StatusOr<std::string> text =
          t.ok() ? t->Render(input.contains("context") ? input["context"] : Json())
                 : absl::StatusOr<std::string>(t.status());
      if (text.ok()) {
        result = {{"ok", true}, {"text", *text}};
      } else {
        result = {{"ok", false}, {"error", std::string(text.status().message())}};
      }
    }
    std::cout << result.dump(-1, ' ', false, Json::error_handler_t::replace) << "\n";
  }
  return 0;
}
