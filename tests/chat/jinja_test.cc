// Unit tests of the Jinja renderer (common/chat/jinja.h) and of RenderChat (chat_template.h).
// Every expected rendering here is what @huggingface/jinja 0.5.13 renders (checked with
// tools/chat-oracle/render.mjs); chat_template_conformance_test compares with it at scale.
#include "common/chat/jinja.h"

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "common/chat/chat_template.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace splitmoe::chat {
namespace {

using Json = nlohmann::ordered_json;

absl::StatusOr<std::string> Render(const std::string& source, const std::string& context = "{}",
                                   const JinjaLimits& limits = JinjaLimits()) {
  absl::StatusOr<JinjaTemplate> t = JinjaTemplate::Parse(source);
  if (!t.ok()) return t.status();
  return t->Render(Json::parse(context), limits);
}

// Renders and expects success.
std::string R(const std::string& source, const std::string& context = "{}") {
  absl::StatusOr<std::string> r = Render(source, context);
  EXPECT_TRUE(r.ok()) << source << "\n" << r.status();
  return r.ok() ? *r : "<error>";
}

// Renders and expects failure; returns the status.
absl::Status E(const std::string& source, const std::string& context = "{}",
               const JinjaLimits& limits = JinjaLimits()) {
  absl::StatusOr<std::string> r = Render(source, context, limits);
  EXPECT_FALSE(r.ok()) << source << " rendered " << (r.ok() ? *r : "");
  return r.status();
}

MATCHER_P2(StatusIs, code, substring, "") {
  return arg.code() == code && absl::StrContains(arg.message(), substring);
}

TEST(JinjaTest, TextAndComments) {
  EXPECT_EQ(R("plain text"), "plain text");
  EXPECT_EQ(R("a{# comment #}b"), "ab");
  EXPECT_EQ(R(""), "");
  EXPECT_EQ(R("one trailing newline dropped\n"), "one trailing newline dropped");
  EXPECT_EQ(R("two\n\n"), "two\n");
}

TEST(JinjaTest, WhitespaceControl) {
  EXPECT_EQ(R("a  {{- ' b ' -}}  c {#- comment -#} d {%- if true -%}  e  {%- endif %}"), "a b cde");
  // trim_blocks and lstrip_blocks, as transformers sets them.
  EXPECT_EQ(R("  {% if true %}\n  yes\n  {% endif %}\nend\n"), "  yes\nend");
  EXPECT_EQ(R("{% for x in [1, 2] %}\n{{ x }}\n{% endfor %}"), "1\n2\n");
  // transformers' generation tags vanish.
  EXPECT_EQ(R("{% generation %}gen{% endgeneration %} x {%- generation -%}  y  "
              "{%- endgeneration -%} z"),
            "gen xyz");
}

TEST(JinjaTest, Literals) {
  EXPECT_EQ(R("{{ 1 + 2 }} {{ 1.0 }} {{ 1.5 }} {{ -0.0 }} {{ 7 / 2 }} {{ 7 // 2 }} {{ -7 % 3 }} "
              "{{ 2 ** 10 }} {{ 2 ** -1 }}"),
            "3 1.0 1.5 -0.0 3.5 3 -1 1024 0.5");
  EXPECT_EQ(R("{{ true }} {{ false }} {{ none }} {{ undefined_x }} {{ True }} {{ None }}"),
            "true false   true ");
  EXPECT_EQ(R("{{ [1, 'a', none, true, 1.0, [2]] }} {{ {'a': 1, 'b': [1,2]} }}"),
            "[1, \"a\", null, true, 1, [2]] {\"a\": 1, \"b\": [1, 2]}");
  EXPECT_EQ(R("{{ \"it's\" }} {{ 'say \"hi\"' }} {{ 'tab\\there' }} {{ '\\u00e9\\x41' }} "
              "{{ 'a' 'b' }} {{ '\\ud83d\\ude00' }}"),
            "it's say \"hi\" tab\there éA ab 😀");
  EXPECT_EQ(R("{{ 10 // 0 }} {{ 1 / 0 }} {{ 5 % 0 }}"), "Infinity Infinity NaN");
  EXPECT_EQ(R("{{ 100000000000000000000 * 10 }} {{ 0.1 + 0.2 }} {{ x }}", R"({"x": 1e-7})"),
            "1e+21 0.30000000000000004 1e-7");
}

TEST(JinjaTest, ContextNumbersAreJavaScriptNumbers) {
  EXPECT_EQ(R("{{ a }} {{ b }} {{ c }} {{ a | tojson }}",
              R"({"a": 2.0, "b": 12345678901234567890, "c": -0.0})"),
            "2 12345678901234567000 0 2");
}

TEST(JinjaTest, ObjectKeysKeepJavaScriptOrder) {
  EXPECT_EQ(R("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}",
              R"({"d": {"b": 1, "a": 2, "10": 3, "2": 4}})"),
            "2=4;10=3;b=1;a=2;");
}

TEST(JinjaTest, Concatenation) {
  EXPECT_EQ(R("{{ 'a' + 1.0 }} {{ 'a' ~ 1.0 }} {{ 'x' ~ none_var }} {{ [1,2] ~ 'z' }} "
              "{{ 'x' ~ {'a': 1} }} {{ [1, none] ~ '' }}"),
            "a1 a1 x 1,2z x[object Map] 1,undefined");
  EXPECT_EQ(R("{{ [1,2] + [3] }}"), "[1, 2, 3]");
}

TEST(JinjaTest, Comparisons) {
  EXPECT_EQ(R("{{ 1 == 1.0 }} {{ '1' == 1 }} {{ none == undef }} {{ [1] == [1] }} {{ l == l }} "
              "{{ 1 in [1, 2] }} {{ 'a' in 'abc' }} {{ 'a' in {'a': 1} }} {{ 3 not in [1] }} "
              "{{ 2 < 3 }} {{ 2 >= 3 }} {{ x in undefined_y }}",
              R"({"l": [1]})"),
            "true true true false true true true true true true false false");
}

TEST(JinjaTest, LogicReturnsOperands) {
  EXPECT_EQ(R("{{ 0 or 'x' }} {{ 1 and 'y' }} {{ [] or 'e' }} {{ '' and 1 }}|{{ none or none }}|"
              "{{ not [] }} {{ not 'a' }}"),
            "x y e ||true false");
  // Short circuit: the right side is not evaluated.
  EXPECT_EQ(R("{{ false and raise_exception('no') }}{{ true or raise_exception('no') }}"),
            "falsetrue");
}

TEST(JinjaTest, Conditionals) {
  EXPECT_EQ(R("{% if x > 1 %}big{% elif x == 1 %}one{% else %}small{% endif %}", R"({"x": 1})"),
            "one");
  EXPECT_EQ(R("{{ 'yes' if 1 > 2 else 'no' }} {{ 'sel' if false }}."), "no .");
  EXPECT_EQ(R("{% if x is defined %}d{% else %}u{% endif %}{% if none is none %}n{% endif %}"
              "{% if y is not none %}nn{% endif %}"),
            "unnn");
}

TEST(JinjaTest, ForLoops) {
  EXPECT_EQ(R("{% for m in msgs %}{{ loop.index }}/{{ loop.length }}:{{ m }}{% if not loop.last "
              "%},{% endif %}{% endfor %}",
              R"({"msgs": ["a", "b", "c"]})"),
            "1/3:a,2/3:b,3/3:c");
  EXPECT_EQ(R("{% for x in [1, 2, 3] %}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}"
              "{{ loop.first }}{{ loop.previtem }}{{ loop.nextitem }};{% endfor %}"),
            "032true2;121false13;210false2;");
  EXPECT_EQ(R("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(R("{% for x in [1,2,3,4] if x is odd %}{{ x }}{{ loop.length }}{% endfor %}"), "1232");
  EXPECT_EQ(R("{% for k in {'b': 1, 'a': 2} %}{{ k }}{% endfor %}"), "ba");
  EXPECT_EQ(R("{% for a, b in [[1, 2], [3, 4]] %}{{ a }}{{ b }}{% endfor %}"), "1234");
}

TEST(JinjaTest, BreakAndContinue) {
  EXPECT_EQ(R("{% for x in [1,2,3] %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}{% endfor %}"),
            "13");
  EXPECT_EQ(R("{% for x in [1,2,3] %}{{ x }}{% if x == 2 %}{% break %}{% endif %}{% endfor %}"),
            "1");
  // As the reference: an iteration ended by continue contributes no output, and a loop whose
  // every iteration continued runs its else block.
  EXPECT_EQ(R("{% for x in [1,2,3] %}a{% continue %}{% else %}E{% endfor %}"), "E");
  EXPECT_THAT(E("{% break %}"), StatusIs(absl::StatusCode::kInvalidArgument, "outside"));
}

TEST(JinjaTest, Set) {
  EXPECT_EQ(R("{% set x = 5 %}{% for i in [1] %}{% set x = 6 %}{{ x }}{% endfor %}{{ x }}"), "65");
  EXPECT_EQ(R("{% set a, b = 1, 2 %}{{ a }}{{ b }}"), "12");
  EXPECT_EQ(R("{% set blk %}  inner {{ 1 }} {% endset %}[{{ blk }}]"), "[  inner 1 ]");
  EXPECT_EQ(R("{% set ns = namespace(a=1, b='x') %}{% set ns.a = ns.a + 1 %}{{ ns.a }}{{ ns.b }}"
              "{{ ns }}"),
            "2x{\"a\": 2, \"b\": \"x\"}");
  EXPECT_EQ(R("{% set ns = namespace(n=0) %}{% for x in [1, 2, 3] %}{% set ns.n = ns.n + x %}"
              "{% endfor %}{{ ns.n }}"),
            "6");
  EXPECT_THAT(E("{% set d = {} %}{% set d.x = 1 %}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "non-namespace"));
}

TEST(JinjaTest, Macros) {
  EXPECT_EQ(R("{% macro greet(name, greeting='Hi') %}{{ greeting }}, {{ name }}!{% endmacro %}"
              "{{ greet('Bob') }} {{ greet('Al', greeting='Yo') }}"),
            "Hi, Bob! Yo, Al!");
  EXPECT_EQ(R("{% macro m() %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, a=3) }}"),
            "[1, 2]{\"a\": 3}");
  EXPECT_EQ(R("{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}"
              "{% call wrap('b') %}body{% endcall %}"),
            "<b>body</b>");
  EXPECT_EQ(R("{% filter upper %}hello {{ 'x' }}{% endfilter %}"), "HELLO X");
  EXPECT_THAT(E("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "takes not more than 1"));
}

TEST(JinjaTest, Access) {
  const std::string ctx = R"({"messages": [{"role": "user", "content": "hi"}], "s": "abcdef"})";
  EXPECT_EQ(R("{{ messages[0]['content'] }}{{ messages[0].role }}{{ messages.0.role }}"
              "{{ messages[-1].role }}{{ messages[5] }}{{ messages[0].nope }}",
              ctx),
            "hiuseruseruser");
  EXPECT_EQ(R("{{ s[1:] }} {{ s[::-1] }} {{ s[:2] }} {{ s[-2:] }} {{ s[1:5:2] }} {{ s[1] }}", ctx),
            "bcdef fedcba ab ef bd b");
  EXPECT_EQ(R("{{ [1,2,3][-1] }} {{ [1,2,3,4,5][1:4:2] }}"), "3 [2, 4]");
  // Undefined values absorb attribute access.
  EXPECT_EQ(R("{{ x.y.z }}|{{ x.y is defined }}|{{ none.a }}"), "|false|");
}

TEST(JinjaTest, StringFiltersAndMethods) {
  EXPECT_EQ(R("{{ '  a b  ' | trim }}|{{ 'abc' | length }}|{{ 'héllo wörld' | upper }}|"
              "{{ 'ABC' | lower }}|{{ 'hello world-foo' | title }}|{{ 'hELLO' | capitalize }}"),
            "a b|3|HÉLLO WÖRLD|abc|Hello World-Foo|HELLO");
  EXPECT_EQ(R("{{ ' x '.strip() }}|{{ ' x '.lstrip() }}|{{ ' x '.rstrip() }}|{{ 'a-b'.upper() }}"),
            "x|x | x|A-B");
  EXPECT_EQ(R("{{ 'a,b,c'.split(',') }} {{ ' a  b '.split() }} {{ 'a,b,c'.split(',', 1) }} "
              "{{ 'abc'.startswith('a') }} {{ 'abc'.endswith(('x','c')) }}"),
            "[\"a\", \"b\", \"c\"] [\"a\", \"b\"] [\"a\", \"b,c\"] true true");
  EXPECT_EQ(R("{{ 'aaa'.replace('a', 'b') }} {{ 'aaa'.replace('a', 'b', 2) }} "
              "{{ 'abc'.replace('', '-') }} {{ 'abc' | replace('b', 'X') }}"),
            "bbb bba -a-b-c- aXc");
  EXPECT_EQ(R("{{ 'a\\nb\\n\\nc' | indent }}|{{ 'a\\nb' | indent(2, true) }}|"
              "{{ 'a\\nb' | indent('>>') }}"),
            "a\n    b\n\n    c|  a\n  b|a\n>>b");
  EXPECT_EQ(R("{{ '3' | int }} {{ '3.7x' | float }} {{ 'x' | int(7) }} {{ 5 | string }} "
              "{{ 1.0 | string }} {{ true | string }} {{ 'x' | safe }}"),
            "3 3.7 7 5 1.0 true x");
  // Lengths count UTF-16 code units; slices count code points; case mapping is Unicode's.
  EXPECT_EQ(
      R("{{ '你好😀é' | length }} {{ '😀abc'[1:] }} {{ 'Σ ΑΣ ßİ' | lower }} {{ 'ßﬁ' | upper }}"),
      "5 abc σ ας ßi̇ SSFI");
}

TEST(JinjaTest, ListAndDictFilters) {
  EXPECT_EQ(R("{{ [3,1,2] | sort }} {{ [3,1,2] | reverse }} {{ [1,2] | first }} {{ [1,2] | last }} "
              "{{ [1,2,1] | unique }} {{ ['a','b'] | join(', ') }} {{ [1,2] | join }} "
              "{{ [1,2] | length }} {{ ['b', 'A', 'a'] | sort }} {{ [1, 2] | list }}"),
            "[1, 2, 3] [2, 1, 3] 1 2 [1, 2] a, b 12 2 [\"A\", \"a\", \"b\"] [1, 2]");
  EXPECT_EQ(R("{{ {'b': 1, 'a': 2} | items }} {{ {'b': 1, 'a': 2} | dictsort }} "
              "{{ {'a': 1} | length }}"),
            "[[\"b\", 1], [\"a\", 2]] [[\"a\", 2], [\"b\", 1]] 1");
  EXPECT_EQ(R("{{ d.get('a') }} {{ d.get('z', 'def') }} {{ d.get('z') }} {{ d.keys() }} "
              "{{ d.values() }} {{ d.items() | list }}",
              R"({"d": {"a": 1}})"),
            "1 def  [\"a\"] [1] [[\"a\", 1]]");
  const std::string msgs =
      R"({"msgs": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})";
  EXPECT_EQ(
      R("{{ msgs | selectattr('role', 'equalto', 'user') | list | length }} "
        "{{ msgs | rejectattr('role', 'equalto', 'user') | map(attribute='content') | list }} "
        "{{ msgs | map(attribute='role') | join(',') }} "
        "{{ msgs | sort(attribute='content', reverse=true) | map(attribute='role') | list }}",
        msgs),
      "1 [\"b\"] user,assistant [\"assistant\", \"user\"]");
  EXPECT_EQ(R("{{ x | default('d') }} {{ '' | default('e', true) }} {{ 0 | default(5) }}"),
            "d e 0");
  EXPECT_EQ(R("{{ -3 | abs }} {{ 3.9 | int }} {{ 2 | float }}"), "3 3 2.0");
  EXPECT_EQ(R("{{ range(3) }} {{ range(1, 4) }} {{ range(5, 0, -2) }}"),
            "[0, 1, 2] [1, 2, 3] [5, 3, 1]");
}

TEST(JinjaTest, ToJson) {
  const std::string ctx = R"({"x": {"b": [1, 2.5, "é\n\"<>&'", null, true], "a": {}, "c": []}})";
  EXPECT_EQ(R("{{ x | tojson }}", ctx),
            "{\"b\": [1, 2.5, \"é\\n\\\"<>&'\", null, true], \"a\": {}, \"c\": []}");
  EXPECT_EQ(R("{{ x | tojson(indent=2) }}", ctx),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\\\"<>&'\",\n    null,\n    true\n  ],\n"
            "  \"a\": {},\n  \"c\": []\n}");
  EXPECT_EQ(R("{{ x | tojson(indent=0) }}", ctx), R("{{ x | tojson }}", ctx));
  EXPECT_EQ(
      R("{{ 'é😀' | tojson(ensure_ascii=true) }} {{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}"
        " {{ [1, {'a': 2}] | tojson(separators=(',', ':')) }} {{ undefined_x | tojson }}"),
      "\"\\u00e9\\ud83d\\ude00\" {\"a\": 2, \"b\": 1} [1,{\"a\":2}] null");
}

TEST(JinjaTest, Tests) {
  EXPECT_EQ(R("{{ 'abc' is string }}{{ 1 is number }}{{ 1.5 is integer }}{{ [] is iterable }}"
              "{{ {} is mapping }}{{ 'ab' is lower }}{{ 'AB' is upper }}{{ f is callable }}"
              "{{ range is callable }}{{ true is boolean }}{{ 2 is even }}{{ 3 is odd }}"
              "{{ none is none }}{{ x is undefined }}{{ 'a' is not string }}{{ true is true }}"
              "{{ 0 is false }}{{ [] is sequence }}"),
            "truetruefalsetruetruetruetruefalsetruetruetruetruetruetruefalsetruefalsetrue");
}

TEST(JinjaTest, RaiseException) {
  const absl::Status s = E("{{ raise_exception('Conversation roles must alternate') }}");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "Conversation roles must alternate");
  EXPECT_TRUE(IsRaisedException(s));
  EXPECT_FALSE(IsRaisedException(E("{{ 'a' < 'b' }}")));
}

TEST(JinjaTest, UnsupportedConstructsAreNamedWithTheirPosition) {
  EXPECT_THAT(
      E("line one\n{% include 'x' %}"),
      StatusIs(absl::StatusCode::kUnimplemented, "unsupported statement: include at line 2 col 1"));
  EXPECT_THAT(E("{% raw %}{% endraw %}"),
              StatusIs(absl::StatusCode::kUnimplemented, "unsupported statement: raw"));
  EXPECT_THAT(E("{{ x | e }}", R"({"x": "<a>"})"),
              StatusIs(absl::StatusCode::kUnimplemented,
                       "unsupported filter: e on StringValue at line 1 col 6"));
  EXPECT_THAT(E("{{ [1] | select('odd') | list }}"),
              StatusIs(absl::StatusCode::kUnimplemented, "unsupported filter: select"));
  EXPECT_THAT(E("{{ 1 is divisibleby(3) }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "syntax error at line 1 col"));
  EXPECT_THAT(E("{{ 1 is float }}"),
              StatusIs(absl::StatusCode::kUnimplemented, "unsupported test: float at line 1 col"));
  EXPECT_THAT(E("{{ '{}'.format(1) }}"),
              StatusIs(absl::StatusCode::kUnimplemented,
                       "unsupported method or function: 'format' of StringValue"));
  EXPECT_THAT(E("{{ [].append(1) }}"),
              StatusIs(absl::StatusCode::kUnimplemented, "'append' of ArrayValue"));
  EXPECT_THAT(E("{{ cycler() }}"),
              StatusIs(absl::StatusCode::kUnimplemented, "unsupported function: 'cycler'"));
  EXPECT_THAT(E("{{ [] | first }}"),
              StatusIs(absl::StatusCode::kUnimplemented, "first of an empty list"));
  EXPECT_THAT(E("{{ 3 ** 0.3 }}"),
              StatusIs(absl::StatusCode::kUnimplemented, "** with an inexact result"));
  EXPECT_THAT(E("{{ range }}"), StatusIs(absl::StatusCode::kUnimplemented, "printing range"));
  EXPECT_THAT(E("{{ '😀'[0] }}"), StatusIs(absl::StatusCode::kUnimplemented, "surrogate"));
}

TEST(JinjaTest, ReferenceErrorsAreErrorsToo) {
  // Python Jinja accepts these; @huggingface/jinja refuses them, and so does this renderer.
  EXPECT_THAT(E("{% for c in 'abc' %}{{ c }}{% endfor %}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "got StringValue at line 1 col 1"));
  EXPECT_THAT(E("{{ 'a' < 'b' }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "Unknown operator"));
  EXPECT_THAT(E("{{ 'x' + none }}"), StatusIs(absl::StatusCode::kInvalidArgument, "null values"));
  EXPECT_THAT(E("{{ x | default }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "Cannot apply filter"));
  EXPECT_THAT(E("{{ (1, 2) }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "Cannot convert to JSON: TupleValue"));
}

TEST(JinjaTest, SyntaxErrorsNameLineAndColumn) {
  EXPECT_THAT(E("a\n{% if true %}unclosed"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "syntax error at line 2 col 1: unclosed 'if' block"));
  EXPECT_THAT(E("{% for x in y %}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "unclosed 'for' block"));
  EXPECT_THAT(E("{% macro m() %}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "unclosed 'macro' block"));
  EXPECT_THAT(E("{% endif %}"), StatusIs(absl::StatusCode::kInvalidArgument, "unexpected"));
  EXPECT_THAT(E("ok\n  {{ 1 + }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "syntax error at line 2 col 10"));
  EXPECT_THAT(E("{{ 'unterminated }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "syntax error at line 1 col 4"));
  EXPECT_THAT(E("{{ x $ y }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "Unexpected character: $"));
  EXPECT_THAT(E("{# no end"), StatusIs(absl::StatusCode::kInvalidArgument, "comment"));
  EXPECT_THAT(E(std::string("\xff\xfe")), StatusIs(absl::StatusCode::kInvalidArgument, "UTF-8"));
}

TEST(JinjaTest, ContextMustNotRedeclareBuiltins) {
  EXPECT_THAT(E("x", R"({"range": 1})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "'range' is already declared"));
  EXPECT_THAT(E("x", R"({"namespace": 1})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "already declared"));
  EXPECT_THAT(E("x", R"([1])"), StatusIs(absl::StatusCode::kInvalidArgument, "JSON object"));
  EXPECT_EQ(R("x", "null"), "x");
}

TEST(JinjaTest, RunawayRenderingIsBounded) {
  JinjaLimits limits;
  limits.max_output_bytes = 1 << 20;
  // Output too large.
  EXPECT_THAT(E("{% for i in range(100000) %}{{ 'x' * 1 if false }}0123456789abcdef{% endfor %}",
                "{}", limits),
              StatusIs(absl::StatusCode::kResourceExhausted, "longer than 1048576 bytes"));
  // Doubling a string.
  EXPECT_THAT(E("{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                "{% set ns.s = ns.s + ns.s %}{% endfor %}",
                "{}", limits),
              StatusIs(absl::StatusCode::kResourceExhausted, "longer than"));
  // Doubling a list.
  limits.max_sequence_length = 1 << 16;
  EXPECT_THAT(E("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
                "{% set ns.l = ns.l + ns.l %}{% endfor %}",
                "{}", limits),
              StatusIs(absl::StatusCode::kResourceExhausted, "sequence longer than"));
  // Unbounded recursion.
  EXPECT_THAT(E("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
              StatusIs(absl::StatusCode::kResourceExhausted, "nests more than"));
  // Too many steps without output.
  limits = JinjaLimits();
  limits.max_steps = 100000;
  EXPECT_THAT(E("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
                "{}", limits),
              StatusIs(absl::StatusCode::kResourceExhausted, "steps"));
  // range() too long.
  limits.max_sequence_length = 1 << 16;
  EXPECT_THAT(E("{{ range(1000000000) | length }}", "{}", limits),
              StatusIs(absl::StatusCode::kResourceExhausted, "sequence longer than"));
  // A step too small to change the counter: the reference never ends.
  EXPECT_THAT(E("{{ range(100000000000000000000, 100000000000000000000 + 100000) }}", "{}", limits),
              StatusIs(absl::StatusCode::kResourceExhausted, "sequence longer than"));
  // Quadratic string building within the output bound.
  limits = JinjaLimits();
  limits.max_copied_bytes = 1 << 26;
  EXPECT_THAT(E("{% set ns = namespace(s='') %}{% for i in range(100000) %}"
                "{% set ns.s = ns.s ~ '0123456789' %}{% endfor %}",
                "{}", limits),
              StatusIs(absl::StatusCode::kResourceExhausted, "copies more than"));
}

TEST(JinjaTest, DeepNestingIsRefusedNotCrashing) {
  std::string deep;
  for (int i = 0; i < 5000; ++i) deep += "(";
  deep += "1";
  for (int i = 0; i < 5000; ++i) deep += ")";
  EXPECT_THAT(E("{{ " + deep + " }}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "nested too deeply"));
  std::string chain = "{{ 1";
  for (int i = 0; i < 100000; ++i) chain += " + 1";
  EXPECT_THAT(E(chain + " }}"), StatusIs(absl::StatusCode::kInvalidArgument, "nested too deeply"));
  std::string blocks;
  for (int i = 0; i < 1000; ++i) blocks += "{% if true %}";
  EXPECT_THAT(E(blocks), StatusIs(absl::StatusCode::kInvalidArgument, "nested too deeply"));
  std::string json;
  for (int i = 0; i < 10000; ++i) json += "[";
  for (int i = 0; i < 10000; ++i) json += "]";
  EXPECT_THAT(E("x", R"({"a": )" + json + "}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "nested deeper"));
}

TEST(JinjaTest, DeeplyNestedValuesAreRefused) {
  EXPECT_THAT(E("{% set ns = namespace(x=[]) %}{% for i in range(2000) %}{% set ns.x = [ns.x] %}"
                "{% endfor %}"),
              StatusIs(absl::StatusCode::kResourceExhausted, "nested deeper than"));
  EXPECT_THAT(E("{% set ns = namespace(x=none) %}{% for i in range(2000) %}"
                "{% set ns.x = namespace(x=ns.x) %}{% endfor %}"),
              StatusIs(absl::StatusCode::kResourceExhausted, "nested deeper than"));
  // A namespace that holds itself renders (and is freed: LeakSanitizer checks).
  EXPECT_EQ(R("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns.me.me is defined }}"), "true");
}

TEST(JinjaTest, TemplatesAreSharedAcrossThreads) {
  absl::StatusOr<JinjaTemplate> t = JinjaTemplate::Parse(
      "{% set ns = namespace(n=0) %}{% for x in xs %}{% set ns.n = ns.n + x %}{% endfor %}"
      "{{ ns.n }}");
  ASSERT_TRUE(t.ok()) << t.status();
  std::vector<std::thread> threads;
  std::vector<std::string> results(8);
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      Json xs = Json::array();
      for (int k = 0; k <= i * 10; ++k) xs.push_back(k);
      absl::StatusOr<std::string> r = t->Render(Json{{"xs", xs}});
      results[static_cast<size_t>(i)] = r.ok() ? *r : r.status().ToString();
    });
  }
  for (std::thread& th : threads) th.join();
  for (int i = 0; i < 8; ++i) {
    const int n = i * 10;
    EXPECT_EQ(results[static_cast<size_t>(i)], std::to_string(n * (n + 1) / 2));
  }
}

// RenderChat --------------------------------------------------------------------------------

// DeepSeek-V3's chat template (third_party/tokenizer/tokenizer_config.json).
constexpr char kDeepSeekV3[] =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif "
    "%}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, "
    "system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] "
    "== 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + "
    "message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = "
    "ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor "
    "%}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == "
    "'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- "
    "if "
    "message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false "
    "-%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first "
    "%}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' "
    "+ '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + "
    "'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' "
    "+ "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor "
    "%}{%- "
    "endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if "
    "ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- "
    "set "
    "ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set "
    "ns.is_tool = true -%}{%- if ns.is_output_first "
    "%}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else "
    "%}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif "
    "%}{%- "
    "endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if "
    "add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}";

ChatRenderOptions DeepSeekOptions() {
  ChatRenderOptions o;
  o.bos_token = "<｜begin▁of▁sentence｜>";
  o.eos_token = "<｜end▁of▁sentence｜>";
  return o;
}

TEST(RenderChatTest, DeepSeekV3Conversation) {
  const Json messages = Json::parse(R"([
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": [{"type": "text", "text": "Thanks"}, {"type": "text", "text": "!"}]}
  ])");
  absl::StatusOr<std::string> r = RenderChat(kDeepSeekV3, messages, DeepSeekOptions());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(
      *r,
      "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Weather in Paris?"
      "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_"
      "weather\n"
      "```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>"
      "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>"
      "<｜tool▁outputs▁end｜>It is sunny.<｜end▁of▁sentence｜><｜User｜>Thanks\n!<｜Assistant｜>");
  ChatRenderOptions no_prompt = DeepSeekOptions();
  no_prompt.add_generation_prompt = false;
  absl::StatusOr<std::string> r2 =
      RenderChat(kDeepSeekV3, Json::parse(R"([{"role": "user", "content": "Hi"}])"), no_prompt);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(*r2, "<｜begin▁of▁sentence｜><｜User｜>Hi");
}

TEST(RenderChatTest, ToolsKeepTheirKeyOrder) {
  ChatRenderOptions o;
  o.tools = Json::parse(R"([{"type": "function", "function": {"name": "f",
      "parameters": {"type": "object", "properties": {"zeta": {}, "alpha": {}}}}}])");
  o.extra = Json{{"greeting", "hi"}};
  absl::StatusOr<std::string> r =
      RenderChat("{{ greeting }} {{ tools | tojson }} {{ add_generation_prompt }}",
                 Json::parse(R"([{"role": "user", "content": "x"}])"), o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r,
            "hi [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": "
            "{\"type\": \"object\", \"properties\": {\"zeta\": {}, \"alpha\": {}}}}}] true");
  // Without tools the template sees none.
  absl::StatusOr<std::string> none =
      RenderChat("{{ tools is none }}", nlohmann::json::parse(R"([])"), ChatRenderOptions());
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(*none, "true");
}

TEST(RenderChatTest, MessagesAreValidated) {
  const ChatRenderOptions o;
  auto error = [&](const char* messages) {
    absl::StatusOr<std::string> r = RenderChat("x", Json::parse(messages), o);
    EXPECT_FALSE(r.ok());
    return r.status();
  };
  EXPECT_THAT(error(R"({"role": "user"})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "messages must be an array"));
  EXPECT_THAT(error(R"([1])"), StatusIs(absl::StatusCode::kInvalidArgument,
                                        "messages[0]: a message must be an object"));
  EXPECT_THAT(error(R"([{"content": "x"}])"), StatusIs(absl::StatusCode::kInvalidArgument,
                                                       "messages[0]: a message needs a \"role\""));
  EXPECT_THAT(error(R"([{"role": 1}])"),
              StatusIs(absl::StatusCode::kInvalidArgument, "\"role\" must be a string"));
  EXPECT_THAT(error(R"([{"role": "user", "content": 5}])"),
              StatusIs(absl::StatusCode::kInvalidArgument, "\"content\" must be a string"));
  EXPECT_THAT(error(R"([{"role": "user", "content": [{"type": "image_url"}]}])"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "messages[0].content[0]: content part type 'image_url' is not supported"));
  EXPECT_THAT(error(R"([{"role": "assistant", "tool_calls": {}}])"),
              StatusIs(absl::StatusCode::kInvalidArgument, "\"tool_calls\" must be an array"));
  EXPECT_THAT(error(R"([{"role": "assistant", "tool_calls": [{"function": {}}]}])"),
              StatusIs(absl::StatusCode::kInvalidArgument, "messages[0].tool_calls[0]"));
  ChatRenderOptions bad;
  bad.extra = Json{{"messages", 1}};
  absl::StatusOr<std::string> r = RenderChat("x", Json::array(), bad);
  EXPECT_THAT(r.status(), StatusIs(absl::StatusCode::kInvalidArgument, "conflicts"));
  absl::StatusOr<std::string> parse = RenderChat("{% if %}", Json::array(), o);
  EXPECT_THAT(parse.status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "parsing the chat template: syntax"));
}

TEST(RenderChatTest, MissingContentBecomesNull) {
  absl::StatusOr<Json> context = ChatTemplateContext(
      Json::parse(R"([{"role": "assistant", "tool_calls": []}])"), ChatRenderOptions());
  ASSERT_TRUE(context.ok()) << context.status();
  EXPECT_TRUE((*context)["messages"][0]["content"].is_null());
}

}  // namespace
}  // namespace splitmoe::chat
