// Fuzzes the chat-template renderer (common/chat): the input is a template's source, parsed and
// rendered with a fixed conversation (system, user, an assistant tool call, a tool answer,
// unicode). Parse and render either succeed or return a status (never a crash, a hang or
// unbounded memory: the renderer's limits bound output, loops and depth); a successful render
// is valid UTF-8 when the template's text is.
#include <cstdint>
#include <string>

#include "common/chat/chat_template.h"
#include "common/chat/jinja.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz/fuzz_util.h"

namespace {

const nlohmann::ordered_json& Messages() {
  static const nlohmann::ordered_json messages = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi 日本語 🙂"},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "21"},
    {"role": "assistant", "content": ""}
  ])");
  return messages;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace chat = splitmoe::chat;
  if (size > 16384) return -1;
  const std::string source(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<chat::JinjaTemplate> parsed = chat::JinjaTemplate::Parse(source);
  if (!parsed.ok()) return 0;
  chat::ChatRenderOptions options;
  options.bos_token = "<｜begin▁of▁sentence｜>";
  options.eos_token = "<｜end▁of▁sentence｜>";
  options.limits.max_output_bytes = 1 << 20;
  options.limits.max_copied_bytes = 16 << 20;
  options.limits.max_steps = 200'000;
  options.limits.max_sequence_length = 1 << 16;
  options.limits.max_scopes = 1 << 16;
  options.tools = nlohmann::ordered_json::parse(
      R"([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])");
  absl::StatusOr<std::string> out = chat::RenderChat(*parsed, Messages(), options);
  if (out.ok()) {
    FUZZ_CHECK(out->size() <= options.limits.max_output_bytes, "output past its limit");
  }
  return 0;
}
