// JsonForError: a JSON value as text for an error message, bounded in depth and length. A value
// from a hostile file may be nested hundreds of thousands of levels deep, where nlohmann's
// dump() recurses once per level and overflows the stack; here, containers deeper than a few
// levels print as "[...]" / "{...}" and the text stops near kMaxChars. Pure; any thread.
//
//   return absl::InvalidArgumentError(absl::StrCat("field 'x' must be an integer, got ",
//                                                  JsonForError(value)));
#ifndef SPLITMOE_COMMON_BASE_JSON_TEXT_H_
#define SPLITMOE_COMMON_BASE_JSON_TEXT_H_

#include <string>
#include <string_view>

#include "nlohmann/json.hpp"

namespace splitmoe {
namespace json_text_internal {

constexpr size_t kMaxChars = 200;
constexpr int kMaxDepth = 3;

inline void Append(const nlohmann::json& v, int depth, std::string* out) {
  if (out->size() > kMaxChars) return;
  if (!v.is_structured()) {
    // Scalars: a string is bounded by the file it came from; cut it here.
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > kMaxChars) s = s.substr(0, kMaxChars) + "...";
    *out += s;
    return;
  }
  const bool array = v.is_array();
  if (depth >= kMaxDepth) {
    *out += v.empty() ? (array ? "[]" : "{}") : (array ? "[...]" : "{...}");
    return;
  }
  *out += array ? '[' : '{';
  bool first = true;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!first) *out += ", ";
    first = false;
    if (out->size() > kMaxChars) {
      *out += "...";
      break;
    }
    if (!array) {
      std::string key = nlohmann::json(it.key()).dump();
      if (key.size() > kMaxChars) key = key.substr(0, kMaxChars) + "...";
      *out += key + ": ";
    }
    Append(it.value(), depth + 1, out);
  }
  *out += array ? ']' : '}';
}

}  // namespace json_text_internal

inline std::string JsonForError(const nlohmann::json& v) {
  std::string out;
  json_text_internal::Append(v, 0, &out);
  return out;
}

// The deepest nesting of arrays and objects in JSON text `text` (brackets inside strings
// ignored), without parsing it: nlohmann parses iteratively but copies and dumps recursively, so
// text from a client is refused past a depth before anything deep reaches the stack.
inline int JsonNesting(std::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

}  // namespace splitmoe

#endif  // SPLITMOE_COMMON_BASE_JSON_TEXT_H_
