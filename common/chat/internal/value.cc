#include "common/chat/internal/value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "common/chat/internal/unicode.h"

namespace splitmoe::chat::internal {
namespace {

constexpr size_t kIndexThreshold = 16;  // OrderedMap builds its hash index past this many keys
constexpr int kMaxJsonDepth = 512;      // nesting of context JSON (FromJson) and of tojson

bool IsAsciiDigit(char c) { return c >= '0' && c <= '9'; }

absl::Status TooLarge(size_t max_bytes) {
  return absl::ResourceExhaustedError(
      absl::StrCat("rendering builds a string longer than ", max_bytes, " bytes"));
}

// Parses [+-]? digits? (. digits?)? ([eE] [+-]? digits)? at s[*pos] (the longest decimal literal
// prefix, as StrDecimalLiteral); returns its length or 0 when no digit was seen.
size_t DecimalPrefix(absl::string_view s, size_t start) {
  size_t i = start;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
  size_t digits = 0;
  while (i < s.size() && IsAsciiDigit(s[i])) ++i, ++digits;
  if (i < s.size() && s[i] == '.') {
    size_t j = i + 1;
    size_t frac = 0;
    while (j < s.size() && IsAsciiDigit(s[j])) ++j, ++frac;
    if (digits + frac > 0) {
      i = j;
      digits += frac;
    }
  }
  if (digits == 0) return 0;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    size_t j = i + 1;
    if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
    if (j < s.size() && IsAsciiDigit(s[j])) {
      while (j < s.size() && IsAsciiDigit(s[j])) ++j;
      i = j;
    }
  }
  return i - start;
}

// Converts a decimal literal (as DecimalPrefix accepts it) to the nearest double.
double DecimalToDouble(absl::string_view literal) {
  bool negative = false;
  if (!literal.empty() && (literal[0] == '+' || literal[0] == '-')) {
    negative = literal[0] == '-';
    literal.remove_prefix(1);
  }
  std::string text(literal);
  if (!text.empty() && text[0] == '.') text.insert(text.begin(), '0');
  if (!text.empty() && text.back() == '.') text.pop_back();
  const size_t dot_e = text.find(".e");
  if (dot_e != std::string::npos) text.erase(dot_e, 1);
  const size_t dot_E = text.find(".E");
  if (dot_E != std::string::npos) text.erase(dot_E, 1);
  double v = 0;
  const auto result = std::from_chars(text.data(), text.data() + text.size(), v);
  if (result.ec == std::errc::result_out_of_range) {
    // from_chars leaves `v` unchanged: overflow is Infinity, underflow 0, as JavaScript rounds.
    const size_t e = text.find_first_of("eE");
    const bool tiny = e != std::string::npos && text.find('-', e) != std::string::npos;
    v = tiny ? 0.0 : HUGE_VAL;
  }
  return negative ? -v : v;
}

// StringToNumber (ToNumber of a string), for loose equality.
double JsStringToNumber(absl::string_view s) {
  s = JsTrim(s);
  if (s.empty()) return 0;
  if (s == "Infinity" || s == "+Infinity") return HUGE_VAL;
  if (s == "-Infinity") return -HUGE_VAL;
  if (s.size() > 2 && s[0] == '0' &&
      ((s[1] | 0x20) == 'x' || (s[1] | 0x20) == 'o' || (s[1] | 0x20) == 'b')) {
    const int radix = (s[1] | 0x20) == 'x' ? 16 : (s[1] | 0x20) == 'o' ? 8 : 2;
    double v = 0;
    for (size_t i = 2; i < s.size(); ++i) {
      const char c = static_cast<char>(s[i] | 0x20);
      int d = IsAsciiDigit(c) ? c - '0' : (c >= 'a' && c <= 'z') ? c - 'a' + 10 : 99;
      if (d >= radix) return NAN;
      v = v * radix + d;
    }
    return v;
  }
  const size_t n = DecimalPrefix(s, 0);
  if (n == 0 || n != s.size()) return NAN;
  return DecimalToDouble(s);
}

// A reference value's primitive (ToPrimitive with hint "default"), as a string.
absl::StatusOr<std::string> ReferencePrimitive(const Value& v) {
  if (v.is_array()) return JsRawToString(v);
  if (v.is_function()) {
    return absl::UnimplementedError(absl::StrCat(
        "unsupported: comparing ", v.function().name,
        " (a function) with a string or number (the reference compares its JavaScript source)"));
  }
  return std::string("[object Map]");
}

enum class RawKind { kUndefined, kBool, kNumber, kString, kReference };

RawKind KindOf(const Value& v) {
  switch (v.type()) {
    case Value::Type::kUndefined:
    case Value::Type::kNull:
      // @huggingface/jinja builds every NullValue without a value: its raw value is undefined.
      return RawKind::kUndefined;
    case Value::Type::kBool:
      return RawKind::kBool;
    case Value::Type::kInt:
    case Value::Type::kFloat:
      return RawKind::kNumber;
    case Value::Type::kString:
      return RawKind::kString;
    default:
      return RawKind::kReference;
  }
}

// Loose equality on raw values, where a reference may have been converted to a primitive string
// (`as_string` set) or a boolean to a number.
struct Raw {
  explicit Raw(RawKind k, double n = 0) : kind(k), number(n) {}
  RawKind kind;
  double number = 0;
  bool boolean = false;
  std::string string;
  const void* identity = nullptr;
};

Raw RawOf(const Value& v) {
  Raw r(KindOf(v));
  if (v.is_number()) r.number = v.number();
  if (v.is_bool()) r.boolean = v.boolean();
  if (v.is_string()) r.string = v.str();
  r.identity = v.identity();
  return r;
}

absl::StatusOr<bool> LooseEqualsRaw(const Raw& x, const Raw& y, const Value* xv, const Value* yv) {
  if (x.kind == y.kind) {
    switch (x.kind) {
      case RawKind::kUndefined:
        return true;
      case RawKind::kBool:
        return x.boolean == y.boolean;
      case RawKind::kNumber:
        return x.number == y.number;
      case RawKind::kString:
        return x.string == y.string;
      case RawKind::kReference:
        return x.identity == y.identity;
    }
  }
  // undefined == null holds, but null and none are both undefined here: one side undefined, the
  // other not, is false.
  if (x.kind == RawKind::kUndefined || y.kind == RawKind::kUndefined) return false;
  if (x.kind == RawKind::kNumber && y.kind == RawKind::kString) {
    return x.number == JsStringToNumber(y.string);
  }
  if (x.kind == RawKind::kString && y.kind == RawKind::kNumber) {
    return JsStringToNumber(x.string) == y.number;
  }
  if (x.kind == RawKind::kBool) {
    Raw n(RawKind::kNumber, x.boolean ? 1.0 : 0.0);
    return LooseEqualsRaw(n, y, nullptr, yv);
  }
  if (y.kind == RawKind::kBool) {
    Raw n(RawKind::kNumber, y.boolean ? 1.0 : 0.0);
    return LooseEqualsRaw(x, n, xv, nullptr);
  }
  if (x.kind == RawKind::kReference && xv != nullptr) {
    Raw p(RawKind::kString);
    absl::StatusOr<std::string> s = ReferencePrimitive(*xv);
    if (!s.ok()) return s.status();
    p.string = *std::move(s);
    return LooseEqualsRaw(p, y, nullptr, yv);
  }
  if (y.kind == RawKind::kReference && yv != nullptr) {
    Raw p(RawKind::kString);
    absl::StatusOr<std::string> s = ReferencePrimitive(*yv);
    if (!s.ok()) return s.status();
    p.string = *std::move(s);
    return LooseEqualsRaw(x, p, xv, nullptr);
  }
  return false;
}

void AppendHex4(unsigned v, std::string* out) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "\\u%04x", v & 0xFFFF);
  *out += buf;
}

// JSON.stringify of a string, then (ensure_ascii) every UTF-16 unit in [0x7F, 0xFFFF] as \uXXXX.
void AppendJsonString(absl::string_view s, bool ensure_ascii, std::string* out) {
  out->push_back('"');
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      switch (c) {
        case '"':
          *out += "\\\"";
          break;
        case '\\':
          *out += "\\\\";
          break;
        case '\b':
          *out += "\\b";
          break;
        case '\f':
          *out += "\\f";
          break;
        case '\n':
          *out += "\\n";
          break;
        case '\r':
          *out += "\\r";
          break;
        case '\t':
          *out += "\\t";
          break;
        default:
          if (c < 0x20 || (c == 0x7F && ensure_ascii)) {
            AppendHex4(c, out);
          } else {
            out->push_back(static_cast<char>(c));
          }
      }
      continue;
    }
    const size_t start = i;
    const char32_t cp = NextCodePoint(s, &i);
    if (!ensure_ascii) {
      out->append(s.data() + start, i - start);
    } else if (cp < 0x10000) {
      AppendHex4(cp, out);
    } else {
      AppendHex4(0xD800 + ((cp - 0x10000) >> 10), out);
      AppendHex4(0xDC00 + ((cp - 0x10000) & 0x3FF), out);
    }
  }
  out->push_back('"');
}

// ICU root collation (String.prototype.localeCompare) for keys made of [A-Za-z0-9_]: '_' before
// digits before letters, letters case-blind first, then lowercase before uppercase.
bool CollationKeySupported(absl::string_view key) {
  return std::all_of(key.begin(), key.end(), [](char c) {
    return c == '_' || IsAsciiDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  });
}

int CollationCompare(absl::string_view a, absl::string_view b) {
  auto primary = [](char c) -> int {
    if (c == '_') return 0;
    if (IsAsciiDigit(c)) return 1 + (c - '0');
    return 11 + ((c | 0x20) - 'a');
  };
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    if (primary(a[i]) != primary(b[i])) return primary(a[i]) < primary(b[i]) ? -1 : 1;
  }
  if (a.size() != b.size()) return a.size() < b.size() ? -1 : 1;
  for (size_t i = 0; i < n; ++i) {
    const bool au = a[i] >= 'A' && a[i] <= 'Z';
    const bool bu = b[i] >= 'A' && b[i] <= 'Z';
    if (au != bu) return au ? 1 : -1;
  }
  return 0;
}

bool IsArrayIndexKey(absl::string_view key, uint64_t* index) {
  if (key.empty() || key.size() > 10) return false;
  if (key.size() > 1 && key[0] == '0') return false;
  uint64_t v = 0;
  for (char c : key) {
    if (!IsAsciiDigit(c)) return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > 4294967294ULL) return false;
  *index = v;
  return true;
}

template <typename Json>
absl::StatusOr<Value> FromJsonImpl(const Json& j, int depth) {
  if (depth > kMaxJsonDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat("context JSON is nested deeper than ", kMaxJsonDepth, " levels"));
  }
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return Value::Null();
    case nlohmann::json::value_t::boolean:
      return Value::Bool(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return Value::Int(static_cast<double>(j.template get<int64_t>()));
    case nlohmann::json::value_t::number_unsigned:
      return Value::Int(static_cast<double>(j.template get<uint64_t>()));
    case nlohmann::json::value_t::number_float: {
      const double d = j.template get<double>();
      // JSON.parse gives a Number; @huggingface/jinja makes an integer of every integral one.
      if (std::isfinite(d) && std::trunc(d) == d) return Value::Int(d);
      return Value::Float(d);
    }
    case nlohmann::json::value_t::string: {
      const std::string& s = j.template get_ref<const std::string&>();
      if (!IsValidUtf8(s)) return absl::InvalidArgumentError("context string is not valid UTF-8");
      return Value::String(s);
    }
    case nlohmann::json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) {
        absl::StatusOr<Value> v = FromJsonImpl(e, depth + 1);
        if (!v.ok()) return v.status();
        items.push_back(*std::move(v));
      }
      return Value::Array(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      // A JavaScript object lists its array-index keys first, in ascending order.
      using Entry = std::pair<const std::string*, const Json*>;
      std::vector<std::pair<uint64_t, Entry>> index_keys;
      std::vector<Entry> other_keys;
      for (auto it = j.begin(); it != j.end(); ++it) {
        uint64_t index;
        if (IsArrayIndexKey(it.key(), &index)) {
          index_keys.push_back({index, Entry(&it.key(), &it.value())});
        } else {
          other_keys.emplace_back(&it.key(), &it.value());
        }
      }
      std::sort(index_keys.begin(), index_keys.end(),
                [](const auto& a, const auto& b) { return a.first < b.first; });
      OrderedMap map;
      auto add = [&](const Entry& e) -> absl::Status {
        if (!IsValidUtf8(*e.first)) {
          return absl::InvalidArgumentError("context key is not valid UTF-8");
        }
        absl::StatusOr<Value> v = FromJsonImpl(*e.second, depth + 1);
        if (!v.ok()) return v.status();
        map.Set(*e.first, *std::move(v));
        return absl::OkStatus();
      };
      for (const auto& [index, entry] : index_keys) {
        absl::Status s = add(entry);
        if (!s.ok()) return s;
      }
      for (const Entry& entry : other_keys) {
        absl::Status s = add(entry);
        if (!s.ok()) return s;
      }
      return Value::Object(std::move(map));
    }
    default:
      return absl::InvalidArgumentError("context holds a JSON value of an unsupported type");
  }
}

}  // namespace

const Value* OrderedMap::Find(absl::string_view key) const {
  return const_cast<OrderedMap*>(this)->Find(key);
}

Value* OrderedMap::Find(absl::string_view key) {
  if (!index_.empty()) {
    auto it = index_.find(key);
    return it == index_.end() ? nullptr : &entries_[it->second].second;
  }
  for (auto& [k, v] : entries_) {
    if (k == key) return &v;
  }
  return nullptr;
}

void OrderedMap::Set(std::string key, Value value) {
  if (Value* existing = Find(key)) {
    *existing = std::move(value);
    return;
  }
  entries_.emplace_back(std::move(key), std::move(value));
  if (!index_.empty()) {
    index_.emplace(entries_.back().first, entries_.size() - 1);
  } else if (entries_.size() > kIndexThreshold) {
    Reindex();
  }
}

bool OrderedMap::Erase(absl::string_view key) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->first == key) {
      entries_.erase(it);
      if (!index_.empty()) Reindex();
      return true;
    }
  }
  return false;
}

void OrderedMap::Reindex() {
  index_.clear();
  if (entries_.size() <= kIndexThreshold) return;
  for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].first, i);
}

Value Value::Bool(bool b) {
  Value v(Type::kBool);
  v.bool_ = b;
  return v;
}

Value Value::Int(double d) {
  Value v(Type::kInt);
  v.number_ = d;
  return v;
}

Value Value::Float(double d) {
  Value v(Type::kFloat);
  v.number_ = d;
  return v;
}

Value Value::String(std::string s) {
  Value v(Type::kString);
  v.string_ = std::make_shared<const std::string>(std::move(s));
  return v;
}

namespace {

int DeepestEntry(const OrderedMap& map) {
  int deepest = 0;
  for (const auto& [k, v] : map.entries()) deepest = std::max(deepest, v.depth());
  return deepest;
}

}  // namespace

Value Value::Array(std::vector<Value> items, bool is_tuple) {
  Value v(Type::kArray);
  v.array_ = std::make_shared<ArrayData>();
  int deepest = 0;
  for (const Value& item : items) deepest = std::max(deepest, item.depth());
  v.array_->items = std::move(items);
  v.array_->is_tuple = is_tuple;
  v.array_->depth = deepest + 1;
  return v;
}

Value Value::Object(OrderedMap map, ObjectKind kind) {
  Value v(Type::kObject);
  v.object_ = std::make_shared<ObjectData>();
  v.object_->kind = kind;
  v.object_->depth = DeepestEntry(map) + 1;
  v.object_->map = std::move(map);
  return v;
}

Value Value::Namespace(OrderedMap map) {
  Value v(Type::kNamespace);
  v.object_ = std::make_shared<ObjectData>();
  v.object_->depth = DeepestEntry(map) + 1;
  v.object_->map = std::move(map);
  return v;
}

Value Value::Function(std::string name, NativeFunction fn, const Value* holds) {
  Value v(Type::kFunction);
  v.function_ = std::make_shared<FunctionData>();
  v.function_->name = std::move(name);
  v.function_->call = std::move(fn);
  v.function_->depth = (holds != nullptr ? holds->depth() : 0) + 1;
  return v;
}

int Value::depth() const {
  switch (type_) {
    case Type::kArray:
      return array_->depth;
    case Type::kObject:
    case Type::kNamespace:
      return object_->depth;
    case Type::kFunction:
      return function_->depth;
    default:
      return 0;
  }
}

void Value::NoteAssigned(int child_depth) const {
  object_->depth = std::max(object_->depth, child_depth + 1);
}

const void* Value::identity() const {
  switch (type_) {
    case Type::kArray:
      return array_.get();
    case Type::kObject:
    case Type::kNamespace:
      return object_.get();
    case Type::kFunction:
      return function_.get();
    default:
      return nullptr;
  }
}

const char* TypeName(const Value& v) {
  switch (v.type()) {
    case Value::Type::kUndefined:
      return "UndefinedValue";
    case Value::Type::kNull:
      return "NullValue";
    case Value::Type::kBool:
      return "BooleanValue";
    case Value::Type::kInt:
      return "IntegerValue";
    case Value::Type::kFloat:
      return "FloatValue";
    case Value::Type::kString:
      return "StringValue";
    case Value::Type::kArray:
      return v.is_tuple() ? "TupleValue" : "ArrayValue";
    case Value::Type::kObject:
      return v.is_kwargs() ? "KeywordArgumentsValue" : "ObjectValue";
    case Value::Type::kNamespace:
      return "NamespaceValue";
    case Value::Type::kFunction:
      return "FunctionValue";
  }
  return "?";
}

bool Truthy(const Value& v) {
  switch (v.type()) {
    case Value::Type::kUndefined:
    case Value::Type::kNull:
      return false;
    case Value::Type::kBool:
      return v.boolean();
    case Value::Type::kInt:
    case Value::Type::kFloat:
      return v.number() != 0 && !std::isnan(v.number());
    case Value::Type::kString:
      return !v.str().empty();
    case Value::Type::kArray:
      return !v.items().empty();
    case Value::Type::kObject:
      return !v.map().empty();
    case Value::Type::kNamespace:
    case Value::Type::kFunction:
      return true;
  }
  return false;
}

std::string JsNumberToString(double v) {
  if (std::isnan(v)) return "NaN";
  if (v == 0) return "0";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  std::string out;
  if (v < 0) {
    out.push_back('-');
    v = -v;
  }
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const absl::string_view sci(buf, static_cast<size_t>(r.ptr - buf));  // "d.ddde+XX"
  const size_t e = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e)) {
    if (c != '.') digits.push_back(c);
  }
  const int exponent = std::atoi(std::string(sci.substr(e + 1)).c_str());
  const int k = static_cast<int>(digits.size());
  const int n = exponent + 1;
  if (k <= n && n <= 21) {
    out += digits;
    out.append(static_cast<size_t>(n - k), '0');
  } else if (0 < n && n <= 21) {
    out += digits.substr(0, static_cast<size_t>(n));
    out.push_back('.');
    out += digits.substr(static_cast<size_t>(n));
  } else if (-6 < n && n <= 0) {
    out += "0.";
    out.append(static_cast<size_t>(-n), '0');
    out += digits;
  } else {
    out.push_back(digits[0]);
    if (k > 1) {
      out.push_back('.');
      out += digits.substr(1);
    }
    out += absl::StrCat("e", n - 1 >= 0 ? "+" : "-", std::abs(n - 1));
  }
  return out;
}

std::string FloatToString(double v) {
  if (v == 0 && std::signbit(v)) return "-0.0";
  if (std::isfinite(v) && std::trunc(v) == v) {
    if (std::fabs(v) >= 1e21) return JsNumberToString(v);  // toFixed falls back to toString
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.1f", v);
    return buf;
  }
  return JsNumberToString(v);
}

absl::StatusOr<std::string> RuntimeToString(const Value& v, size_t max_bytes) {
  switch (v.type()) {
    case Value::Type::kUndefined:
    case Value::Type::kNull:  // String(undefined): a NullValue holds no value
      return std::string("undefined");
    case Value::Type::kBool:
      return std::string(v.boolean() ? "true" : "false");
    case Value::Type::kInt:
      return JsNumberToString(v.number());
    case Value::Type::kFloat:
      return FloatToString(v.number());
    case Value::Type::kString:
      return v.str();
    case Value::Type::kArray:
    case Value::Type::kObject:
    case Value::Type::kNamespace: {
      std::string out;
      JsonOptions options;
      options.max_bytes = max_bytes;
      absl::Status s = ToJson(v, options, 0, /*undefined_as_null=*/false, &out);
      if (!s.ok()) return s;
      return out;
    }
    case Value::Type::kFunction:
      return absl::UnimplementedError(
          absl::StrCat("unsupported: printing ", v.function().name,
                       " (a function; the reference prints its JavaScript source)"));
  }
  return std::string();
}

absl::StatusOr<std::string> JsRawToString(const Value& v, size_t max_bytes) {
  switch (v.type()) {
    case Value::Type::kUndefined:
    case Value::Type::kNull:
      return absl::InvalidArgumentError(
          absl::StrCat("cannot convert ", TypeName(v), " to a string"));
    case Value::Type::kBool:
      return std::string(v.boolean() ? "true" : "false");
    case Value::Type::kInt:
    case Value::Type::kFloat:
      return JsNumberToString(v.number());
    case Value::Type::kString:
      return v.str();
    case Value::Type::kArray: {
      std::string out;
      bool first = true;
      for (const Value& e : v.items()) {
        if (!first) out.push_back(',');
        first = false;
        absl::StatusOr<std::string> s = RuntimeToString(e, max_bytes);
        if (!s.ok()) return s.status();
        out += *s;
        if (out.size() > max_bytes) return TooLarge(max_bytes);
      }
      return out;
    }
    case Value::Type::kObject:
    case Value::Type::kNamespace:
      return std::string("[object Map]");
    case Value::Type::kFunction:
      return absl::UnimplementedError(
          absl::StrCat("unsupported: converting ", v.function().name, " (a function) to a string"));
  }
  return std::string();
}

absl::StatusOr<std::string> JsJoinElement(const Value& v, size_t max_bytes) {
  if (v.is_null() || v.is_undefined()) return std::string();
  return JsRawToString(v, max_bytes);
}

absl::Status ToJson(const Value& v, const JsonOptions& options, int depth, bool undefined_as_null,
                    std::string* out) {
  if (depth > kMaxJsonDepth) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tojson: value nested deeper than ", kMaxJsonDepth, " levels"));
  }
  const absl::string_view item_separator =
      options.separators ? absl::string_view(options.separators->first)
                         : (options.indent != 0 ? absl::string_view(",") : absl::string_view(", "));
  const absl::string_view key_separator =
      options.separators ? absl::string_view(options.separators->second) : absl::string_view(": ");
  switch (v.type()) {
    case Value::Type::kNull:
      *out += "null";
      return absl::OkStatus();
    case Value::Type::kUndefined:
      *out += undefined_as_null ? "null" : "undefined";
      return absl::OkStatus();
    case Value::Type::kInt:
    case Value::Type::kFloat:
      *out += std::isfinite(v.number()) ? JsNumberToString(v.number()) : "null";
      return absl::OkStatus();
    case Value::Type::kBool:
      *out += v.boolean() ? "true" : "false";
      return absl::OkStatus();
    case Value::Type::kString:
      AppendJsonString(v.str(), options.ensure_ascii, out);
      return absl::OkStatus();
    case Value::Type::kArray:
    case Value::Type::kObject:
    case Value::Type::kNamespace: {
      if (v.is_tuple() || v.is_kwargs()) break;
      const std::string indent(static_cast<size_t>(options.indent), ' ');
      std::string base_padding = "\n";
      for (int i = 0; i < depth; ++i) base_padding += indent;
      const std::string children_padding = base_padding + indent;
      const bool pretty = options.indent != 0;
      if (v.is_array()) {
        const std::vector<Value>& items = v.items();
        out->push_back('[');
        if (pretty && !items.empty()) *out += children_padding;
        for (size_t i = 0; i < items.size(); ++i) {
          if (i > 0) {
            out->append(item_separator.data(), item_separator.size());
            if (pretty) *out += children_padding;
          }
          absl::Status s = ToJson(items[i], options, depth + 1, undefined_as_null, out);
          if (!s.ok()) return s;
          if (out->size() > options.max_bytes) return TooLarge(options.max_bytes);
        }
        if (pretty && !items.empty()) *out += base_padding;
        out->push_back(']');
        return absl::OkStatus();
      }
      std::vector<const std::pair<std::string, Value>*> entries;
      for (const auto& e : v.map().entries()) entries.push_back(&e);
      if (options.sort_keys) {
        for (const auto* e : entries) {
          if (!CollationKeySupported(e->first)) {
            return absl::UnimplementedError(absl::StrCat(
                "unsupported: tojson(sort_keys=true) with key ", e->first,
                " (the reference sorts by locale collation; only keys of [A-Za-z0-9_] are "
                "supported)"));
          }
        }
        std::stable_sort(entries.begin(), entries.end(), [](const auto* a, const auto* b) {
          return CollationCompare(a->first, b->first) < 0;
        });
      }
      out->push_back('{');
      for (size_t i = 0; i < entries.size(); ++i) {
        if (i > 0) out->append(item_separator.data(), item_separator.size());
        if (pretty) *out += children_padding;
        AppendJsonString(entries[i]->first, options.ensure_ascii, out);
        out->append(key_separator.data(), key_separator.size());
        absl::Status s = ToJson(entries[i]->second, options, depth + 1, undefined_as_null, out);
        if (!s.ok()) return s;
        if (out->size() > options.max_bytes) return TooLarge(options.max_bytes);
      }
      if (pretty && !entries.empty()) *out += base_padding;
      out->push_back('}');
      return absl::OkStatus();
    }
    case Value::Type::kFunction:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat("Cannot convert to JSON: ", TypeName(v)));
}

absl::StatusOr<bool> LooseEquals(const Value& a, const Value& b) {
  return LooseEqualsRaw(RawOf(a), RawOf(b), &a, &b);
}

bool StrictEquals(const Value& a, const Value& b) {
  const RawKind ka = KindOf(a);
  if (ka != KindOf(b)) return false;
  switch (ka) {
    case RawKind::kUndefined:
      return true;
    case RawKind::kBool:
      return a.boolean() == b.boolean();
    case RawKind::kNumber:
      return a.number() == b.number();
    case RawKind::kString:
      return a.str() == b.str();
    case RawKind::kReference:
      return a.identity() == b.identity();
  }
  return false;
}

bool SameValueZero(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number() && std::isnan(a.number()) && std::isnan(b.number())) {
    return true;
  }
  return StrictEquals(a, b);
}

double JsParseInt(absl::string_view s) {
  s = JsTrimStart(s);
  bool negative = false;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    negative = s[0] == '-';
    s.remove_prefix(1);
  }
  size_t n = 0;
  while (n < s.size() && IsAsciiDigit(s[n])) ++n;
  if (n == 0) return NAN;
  const double v = DecimalToDouble(s.substr(0, n));
  return negative ? -v : v;
}

double JsParseFloat(absl::string_view s) {
  s = JsTrimStart(s);
  size_t sign = (!s.empty() && (s[0] == '+' || s[0] == '-')) ? 1 : 0;
  if (s.substr(sign, 8) == "Infinity") return (sign && s[0] == '-') ? -HUGE_VAL : HUGE_VAL;
  const size_t n = DecimalPrefix(s, 0);
  if (n == 0) return NAN;
  return DecimalToDouble(s.substr(0, n));
}

absl::StatusOr<Value> FromJson(const nlohmann::json& j) { return FromJsonImpl(j, 0); }
absl::StatusOr<Value> FromJson(const nlohmann::ordered_json& j) { return FromJsonImpl(j, 0); }

}  // namespace splitmoe::chat::internal
