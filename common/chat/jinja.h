// A Jinja renderer for chat templates that renders byte for byte as @huggingface/jinja (the
// implementation transformers.js uses; tools/chat-oracle pins the version it is checked against),
// configured as HF transformers renders chat templates: trim_blocks and lstrip_blocks on.
// Undefined variables render as nothing and are false; `is defined`, `is none` etc. work.
//
// A JinjaTemplate is immutable once parsed: parse once, then Render from any number of threads.
// Render never crashes or hangs on any template or context: past JinjaLimits it fails with
// ResourceExhausted.
//
//   absl::StatusOr<JinjaTemplate> t = JinjaTemplate::Parse("{{ bos }}{% for m in messages %}"
//                                                          "{{ m.content | trim }}{% endfor %}");
//   absl::StatusOr<std::string> text = t->Render(nlohmann::json{{"bos", "<s>"}, ...});
//
// Supported (what @huggingface/jinja supports): {{ }}, {% %}, {# #} and `-` whitespace control;
// if/elif/else, for (loop.index/index0/revindex/revindex0/first/last/length/previtem/nextitem,
// tuple unpacking, `for x in xs if cond`, else, break, continue), set (plain, tuple,
// `ns.attr = v`, block set), macro (defaults, varargs, kwargs, caller) and {% call %},
// {% filter %}, namespace(), raise_exception(), range(), strftime_now(); literals (strings with
// escapes, ints, floats, true/false/none in both cases, lists, dicts, tuples), attribute, index,
// negative index and slice access, calls with keyword arguments and * / ** unpacking, unary
// not/-/+, binary + - * / // % ** ~, comparisons, in / not in, and/or (returning an operand),
// `x if c else y`, `x if c`, and what the reference implements of these:
//   filters  safe, tojson(indent, ensure_ascii, sort_keys, separators), string, length, list,
//            first, last, reverse, sort(reverse, case_sensitive, attribute), unique, join,
//            upper, lower, title, capitalize, trim, indent(width, first, blank), replace, int,
//            float, abs, bool, default(value, boolean), items, dictsort, map(attribute=,
//            default=), selectattr / rejectattr (string literal arguments), and an object's
//            get / keys / values as filters;
//   tests    defined, undefined, none, string, number, integer, boolean, true, false, mapping,
//            iterable, sequence, callable, odd, even, lower, upper (equalto / eq in selectattr);
//   methods  of strings: upper, lower, strip, lstrip, rstrip, title, capitalize, startswith,
//            endswith, split, replace, length; of dicts: get, items, keys, values, dictsort; of
//            lists: length.
// The reference refuses the rest (e.g. filters e/escape, select, reject, round, count, min;
// tests float, in, divisibleby; methods format, join, find, append; statements include, raw,
// with, do): so does this renderer, naming them.
//
// Errors: parse errors are InvalidArgument naming line and column; a construct outside the
// subset is Unimplemented ("unsupported statement: include at line 3 col 1", "unsupported filter:
// e on StringValue at line 1 col 9"); a type error is InvalidArgument with its position; a
// raise_exception("msg") is InvalidArgument whose message is exactly "msg" (IsRaisedException
// tells it apart).
//
// Where @huggingface/jinja differs from Python Jinja (this renderer follows @huggingface/jinja):
//   * `{{ }}` prints booleans as true/false, none and undefined as nothing, floats with a ".0"
//     when integral (1.0), integers as JavaScript numbers (1e+21 past 1e21); lists and dicts
//     print as JSON (`["a", 1]`, `{"k": "v"}`), not as Python reprs.
//   * Numbers from the context are JavaScript numbers: an integral JSON float (1.0) is an
//     integer; `+` and `~` print floats without ".0" ("a" + 1.0 == "a1").
//   * `%` takes the sign of the dividend (-7 % 3 == -1); division by zero gives Infinity/NaN.
//   * `==` is JavaScript's loose equality on the raw values (1 == "1" is true, lists and dicts
//     compare by identity); `in` on a list uses ===.
//   * `|tojson` keeps non-ASCII characters, prints integral floats as integers, and `indent=0`
//     means no indentation; object keys keep their JSON order, array-index keys ("0", "1")
//     first (as JavaScript objects do).
//   * String lengths and indices count UTF-16 code units; slices count code points.
//   * strip/lstrip/rstrip ignore their argument; title() capitalizes after any non-[A-Za-z0-9_]
//     character and keeps the rest's case; capitalize() keeps the rest's case.
//   * Iterating a string, none or undefined fails; `|string` fails on dicts; `<` between strings
//     fails; dicts are not `iterable`; `x is divisibleby(3)` and other tests with arguments fail.
//   * Filters without parentheses and with them are different functions (`|default` without
//     arguments fails); `|map` takes only attribute=; `|selectattr` takes only string literals.
//   * `-x|f` is `(-x)|f`; `not a not b` is `not b`; list, dict and argument items need no commas.
//   * An iteration ended by break/continue contributes no output; a for-else runs when no
//     iteration completed (even if the loop ran but every iteration continued).
//   * Macros see the scope they were defined in; `set` inside a for loop stays in the loop.
//   * Attributes of undefined and none are undefined (no error); `ns[k] = v` sets attribute "k".
//   * none's raw JavaScript value is undefined: `[none] ~ ""` gives "undefined", and
//     `[none, undefined_var] | unique` keeps one of them.
//   * `1e5` is not a number literal (it reads as `1 e5`).
//   * Context keys named like a builtin (range, namespace, true, none, ...) are refused.
//
// Left out (Unimplemented errors) where the reference's result cannot be reproduced exactly:
// printing a function (the reference prints JavaScript source), `|first`/`|last` of an empty
// list (a raw JavaScript undefined), string indices that split a UTF-16 surrogate pair, \u escapes
// of lone surrogates, tojson(sort_keys=true) with keys outside [A-Za-z0-9_] (locale collation),
// sorting NaN, `**` with an inexact result (V8's pow rounds unlike the C library's; exact
// results such as integer powers, powers of two, x ** 0.5 are supported). A context that is not
// a JSON object (or null) is refused.
#ifndef SPLITMOE_COMMON_CHAT_JINJA_H_
#define SPLITMOE_COMMON_CHAT_JINJA_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/chat/jinja_limits.h"
#include "nlohmann/json.hpp"

namespace splitmoe::chat {

namespace internal {
struct Node;
}  // namespace internal

// A parsed Jinja template (the subset real chat templates use). Copies share the parsed tree.
class JinjaTemplate {
 public:
  // Parses `source` (UTF-8, at most 8 MiB). Parse errors name line and column.
  static absl::StatusOr<JinjaTemplate> Parse(std::string_view source);

  // Renders with `context` (a JSON object, or null: its members are the template's variables).
  // Errors: unsupported construct / filter / test / method named, raise_exception's message,
  // type errors; ResourceExhausted past `limits`. nlohmann::json sorts object keys, so objects
  // that `tojson` prints (tool schemas) keep their order only through the ordered_json overload.
  absl::StatusOr<std::string> Render(const nlohmann::json& context,
                                     const JinjaLimits& limits = JinjaLimits()) const;
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context,
                                     const JinjaLimits& limits = JinjaLimits()) const;

 private:
  explicit JinjaTemplate(std::shared_ptr<const internal::Node> program)
      : program_(std::move(program)) {}

  std::shared_ptr<const internal::Node> program_;
};

// Whether `status` came from the template's raise_exception() (its message is the template's).
bool IsRaisedException(const absl::Status& status);

}  // namespace splitmoe::chat

#endif  // SPLITMOE_COMMON_CHAT_JINJA_H_
