#include "common/chat/internal/interpreter.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <deque>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/status_macros.h"
#include "common/chat/internal/unicode.h"

namespace splitmoe::chat::internal {

// A scope: the variables a template sets, chained to the enclosing scope. As in the reference,
// every scope implicitly holds `namespace` (unless it sets its own).
struct Env {
  Env* parent = nullptr;
  bool call_block_scope = false;  // the scope a {% call %} block passes to its macro
  absl::flat_hash_map<std::string, Value> vars;
};

namespace {

using NodePtr = std::unique_ptr<Node>;

constexpr char kControlPayload[] = "splitmoe.chat/control";
// Deepest nesting of arrays, objects and namespaces a render may build.
constexpr int kMaxValueDepth = 512;
constexpr char kPositionedPayload[] = "splitmoe.chat/positioned";

absl::Status ControlSignal(absl::string_view which) {
  absl::Status s(absl::StatusCode::kAborted, absl::StrCat("'", which, "' outside of a for loop"));
  s.SetPayload(kControlPayload, absl::Cord(which));
  return s;
}

// "break", "continue", or empty for other statuses.
std::string ControlKind(const absl::Status& s) {
  const auto p = s.GetPayload(kControlPayload);
  return p ? std::string(*p) : std::string();
}

absl::Status Error(absl::string_view message) { return absl::InvalidArgumentError(message); }
absl::Status Unsupported(absl::string_view message) {
  return absl::UnimplementedError(absl::StrCat("unsupported ", message));
}

// Which of the special names `caller`, `kwargs`, `varargs` a macro body reads before declaring
// them (the reference's findAccessedSpecialMacroArguments, in Jinja's visiting order).
struct SpecialArgs {
  bool caller = false;
  bool kwargs = false;
  bool varargs = false;
};

class SpecialArgsFinder {
 public:
  SpecialArgs Find(const std::vector<NodePtr>& parameters, const std::vector<NodePtr>& body) {
    for (const NodePtr& p : parameters) DeclareParameter(*p);
    VisitList(body);
    return accessed_;
  }

 private:
  static int Index(absl::string_view name) {
    if (name == "caller") return 0;
    if (name == "kwargs") return 1;
    if (name == "varargs") return 2;
    return -1;
  }
  void Declare(absl::string_view name) {
    const int i = Index(name);
    if (i >= 0) declared_[i] = true;
  }
  void DeclareParameter(const Node& p) { Declare(p.name); }
  void DeclareTarget(const Node& t) {
    if (t.kind == NodeKind::kIdentifier) {
      Declare(t.name);
    } else if (t.kind == NodeKind::kTuple) {
      for (const NodePtr& e : t.list) DeclareTarget(*e);
    }
  }
  void VisitDefaults(const std::vector<NodePtr>& parameters) {
    for (const NodePtr& p : parameters) {
      if (p->kind == NodeKind::kKeywordArg) Visit(p->a.get());
    }
  }
  void VisitFilter(const Node* filter) {
    if (filter != nullptr && filter->kind == NodeKind::kCall) VisitList(filter->list);
  }
  void VisitList(const std::vector<NodePtr>& nodes) {
    for (const NodePtr& n : nodes) Visit(n.get());
  }
  void Visit(const Node* n) {
    if (n == nullptr) return;
    switch (n->kind) {
      case NodeKind::kFor:
        DeclareTarget(*n->a);
        if (n->b->kind == NodeKind::kSelect) {
          Visit(n->b->a.get());
          VisitList(n->list);
          VisitList(n->list2);
          Visit(n->b->b.get());
        } else {
          Visit(n->b.get());
          VisitList(n->list);
          VisitList(n->list2);
        }
        return;
      case NodeKind::kSet:
        DeclareTarget(*n->a);
        Visit(n->b.get());
        VisitList(n->list);
        return;
      case NodeKind::kMacro:
        for (const NodePtr& p : n->list) DeclareParameter(*p);
        VisitDefaults(n->list);
        VisitList(n->list2);
        return;
      case NodeKind::kCallStatement:
        Visit(n->a.get());
        for (const NodePtr& p : n->list) DeclareParameter(*p);
        VisitDefaults(n->list);
        VisitList(n->list2);
        return;
      case NodeKind::kFilterStatement:
        VisitList(n->list);
        VisitFilter(n->a.get());
        return;
      case NodeKind::kIdentifier: {
        const int i = Index(n->name);
        if (i == 0 && !declared_[0]) accessed_.caller = true;
        if (i == 1 && !declared_[1]) accessed_.kwargs = true;
        if (i == 2 && !declared_[2]) accessed_.varargs = true;
        return;
      }
      case NodeKind::kMember:
        Visit(n->a.get());
        if (n->flag) Visit(n->b.get());
        return;
      case NodeKind::kFilter:
        Visit(n->a.get());
        VisitFilter(n->b.get());
        return;
      case NodeKind::kTest:
        Visit(n->a.get());
        return;
      case NodeKind::kSelect:
        Visit(n->b.get());
        Visit(n->a.get());
        return;
      case NodeKind::kKeywordArg:
        Visit(n->a.get());
        return;
      case NodeKind::kObject:
        for (size_t i = 0; i < n->list.size(); ++i) {
          Visit(n->list[i].get());
          Visit(n->list2[i].get());
        }
        return;
      default:
        // Every child, in the order of the reference's constructor fields.
        Visit(n->a.get());
        Visit(n->b.get());
        Visit(n->c.get());
        VisitList(n->list);
        VisitList(n->list2);
        return;
    }
  }

  bool declared_[3] = {false, false, false};
  SpecialArgs accessed_;
};

// The UTF-16 unit at `index` (negative: from the end) of `s`, as String.prototype.at.
absl::StatusOr<std::optional<std::string>> StringAt(const std::string& s, double index) {
  const double length = static_cast<double>(Utf16Length(s));
  double k = std::isnan(index) ? 0 : std::trunc(index);
  if (k < 0) k += length;
  if (k < 0 || k >= length) return std::optional<std::string>();
  size_t units = 0;
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    const char32_t cp = NextCodePoint(s, &i);
    const size_t width = cp >= 0x10000 ? 2 : 1;
    if (k < static_cast<double>(units + width)) {
      if (width == 2) {
        return Unsupported(
            "string index inside a character outside the Basic Multilingual Plane (the reference "
            "returns half of a UTF-16 surrogate pair)");
      }
      return std::optional<std::string>(s.substr(start, i - start));
    }
    units += width;
  }
  return std::optional<std::string>();
}

// The code points of `s`, one string each (Array.from(string)).
std::vector<std::string> CodePoints(absl::string_view s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    NextCodePoint(s, &i);
    out.emplace_back(s.substr(start, i - start));
  }
  return out;
}

// utils.slice: Python-like slicing with JavaScript arithmetic. Returns the selected indices.
std::vector<size_t> SliceIndices(size_t size, std::optional<double> start_in,
                                 std::optional<double> stop_in, std::optional<double> step_in) {
  const double length = static_cast<double>(size);
  const double step = step_in.value_or(1);
  const double direction = std::isnan(step) ? NAN : static_cast<double>((step > 0) - (step < 0));
  double start, stop;
  if (direction >= 0) {
    start = start_in.value_or(0);
    start = start < 0 ? std::max(length + start, 0.0) : std::min(start, length);
    stop = stop_in.value_or(length);
    stop = stop < 0 ? std::max(length + stop, 0.0) : std::min(stop, length);
  } else {
    start = start_in.value_or(length - 1);
    start = start < 0 ? std::max(length + start, -1.0) : std::min(start, length - 1);
    stop = stop_in.value_or(-1);
    stop = stop < -1 ? std::max(length + stop, -1.0) : std::min(stop, length - 1);
  }
  std::vector<size_t> out;
  // As JavaScript's loop: a floating-point counter (bounded by the size check below).
  // NOLINTNEXTLINE(clang-analyzer-security.FloatLoopCounter)
  for (double i = start; direction * i < direction * stop; i += step) {
    if (i >= 0 && i < length) out.push_back(static_cast<size_t>(i));
    if (out.size() > size) break;  // cannot happen for a finite step; a guard all the same
  }
  return out;
}

// getAttributeValue: "a.b.0" through objects (own entries) and arrays.
Value GetAttributeValue(const Value& item, absl::string_view path) {
  Value value = item;
  size_t begin = 0;
  while (true) {
    const size_t dot = path.find('.', begin);
    const absl::string_view part =
        path.substr(begin, dot == absl::string_view::npos ? absl::string_view::npos : dot - begin);
    if (value.is_attribute_container()) {
      const Value* v = value.map().Find(part);
      value = v != nullptr ? *v : Value::Undefined();
    } else if (value.is_array()) {
      const double index = JsParseInt(part);
      if (!std::isnan(index) && index >= 0 && index < static_cast<double>(value.items().size())) {
        value = value.items()[static_cast<size_t>(index)];
      } else {
        return Value::Undefined();
      }
    } else {
      return Value::Undefined();
    }
    if (dot == absl::string_view::npos) break;
    begin = dot + 1;
  }
  return value;
}

bool IsNumericLike(const Value& v) { return v.is_number() || v.is_bool(); }

// JavaScript's a ** b where this renderer can reproduce it exactly: V8 computes pow with fdlibm,
// which rounds differently from the C library in the last digit of inexact results, so only
// results that both compute exactly are supported.
absl::StatusOr<double> JsPow(double a, double b) {
  if (std::isnan(b)) return NAN;
  if (b == 0) return 1.0;
  if (std::isnan(a)) return NAN;
  if (std::fabs(a) == 1 && std::isinf(b)) return NAN;                   // C's pow gives 1
  if (std::isinf(a) || std::isinf(b) || a == 0) return std::pow(a, b);  // IEEE special cases
  if (a == 1) return 1.0;
  if (a == -1 && std::trunc(b) == b) return std::fmod(b, 2) == 0 ? 1.0 : -1.0;
  if (b == 1) return a;
  if (b == -1) return 1 / a;
  if (b == 2) return a * a;
  if (b == 0.5 && a > 0) return std::sqrt(a);
  const bool integral_b = std::trunc(b) == b;
  int exponent;
  if (integral_b && std::fabs(std::frexp(a, &exponent)) == 0.5) {
    // ±2^(exponent-1) to an integer power: exact (or overflow / underflow) in both.
    return std::pow(a, b);
  }
  if (integral_b && b > 0 && std::trunc(a) == a) {
    const double r = std::pow(a, b);
    // fdlibm: "pow(integer,integer) always returns the correct integer provided it is
    // representable"; a correctly rounded pow does too.
    if (std::fabs(r) <= 9007199254740992.0) return r;
  }
  return absl::UnimplementedError(absl::StrCat(
      "unsupported ** with an inexact result (", JsNumberToString(a), " ** ", JsNumberToString(b),
      "): JavaScript's pow rounds differently in the last digit"));
}

// A key equal for two values exactly when SameValueZero holds.
std::string SameValueZeroKey(const Value& v) {
  switch (v.type()) {
    case Value::Type::kUndefined:
    case Value::Type::kNull:  // none's raw value is undefined too
      return "u";
    case Value::Type::kBool:
      return v.boolean() ? "b1" : "b0";
    case Value::Type::kInt:
    case Value::Type::kFloat: {
      const double d = v.number();
      if (std::isnan(d)) return "dNaN";
      return absl::StrCat("d", JsNumberToString(d == 0 ? 0.0 : d));
    }
    case Value::Type::kString:
      return absl::StrCat("s", v.str());
    default:
      return absl::StrCat("r", reinterpret_cast<uintptr_t>(v.identity()));
  }
}
double NumericValue(const Value& v) { return v.is_bool() ? (v.boolean() ? 1 : 0) : v.number(); }

// compareRuntimeValues.
absl::StatusOr<int> CompareValues(const Value& a, const Value& b, bool case_sensitive) {
  if (a.is_null() && b.is_null()) return 0;
  if (a.is_null() || b.is_null() || (a.is_undefined() != b.is_undefined())) {
    return Error(absl::StrCat("Cannot compare ", TypeName(a), " with ", TypeName(b)));
  }
  if (a.is_undefined()) return 0;
  if (IsNumericLike(a) && IsNumericLike(b)) {
    const double x = NumericValue(a);
    const double y = NumericValue(b);
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (absl::string_view(TypeName(a)) != TypeName(b)) {
    return Error(
        absl::StrCat("Cannot compare different types: ", TypeName(a), " and ", TypeName(b)));
  }
  if (a.is_string()) {
    if (case_sensitive) return CompareUtf16(a.str(), b.str());
    return CompareUtf16(JsToLower(a.str()), JsToLower(b.str()));
  }
  return Error(absl::StrCat("Cannot compare type: ", TypeName(a)));
}

// Stably sorts `items` by `keys` (same length) with CompareValues, as Array.prototype.sort with
// that comparator. Rejects, as the comparator would, keys that cannot all be compared.
absl::StatusOr<std::vector<Value>> SortByKeys(const std::vector<Value>& items,
                                              const std::vector<Value>& keys, bool case_sensitive,
                                              bool reverse) {
  if (items.size() >= 2) {
    // Every adjacent pair of the result is compared: any incomparable pair fails the sort.
    for (size_t i = 1; i < keys.size(); ++i) {
      SPLITMOE_RETURN_IF_ERROR(CompareValues(keys[0], keys[i], case_sensitive).status());
    }
    SPLITMOE_RETURN_IF_ERROR(CompareValues(keys[0], keys[0], case_sensitive).status());
    for (const Value& k : keys) {
      if (IsNumericLike(k) && std::isnan(NumericValue(k))) {
        return Unsupported("sort of NaN (the reference's order is then engine-defined)");
      }
    }
  }
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::vector<std::string> lowered;
  if (!case_sensitive && !keys.empty() && keys[0].is_string()) {
    for (const Value& k : keys) lowered.push_back(JsToLower(k.str()));
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
    int r;
    if (!lowered.empty()) {
      r = CompareUtf16(lowered[x], lowered[y]);
    } else if (keys[x].is_string()) {
      r = CompareUtf16(keys[x].str(), keys[y].str());
    } else if (IsNumericLike(keys[x])) {
      const double a = NumericValue(keys[x]);
      const double b = NumericValue(keys[y]);
      r = a < b ? -1 : a > b ? 1 : 0;
    } else {
      r = 0;  // all null or all undefined
    }
    return (reverse ? -r : r) < 0;
  });
  std::vector<Value> out;
  out.reserve(items.size());
  for (size_t i : order) out.push_back(items[i]);
  return out;
}

// The tests of `is` and selectattr (Environment.TESTS). `b` is the second argument, if any.
// NotFound for an unknown test.
absl::StatusOr<bool> RunTest(absl::string_view name, const Value& a, const Value* b) {
  if (name == "boolean") return a.is_bool();
  if (name == "callable") return a.is_function();
  if (name == "odd" || name == "even") {
    if (!a.is_int()) return Error(absl::StrCat("cannot ", name, " on ", TypeName(a)));
    const bool odd = std::fmod(a.number(), 2) != 0;
    return name == "odd" ? odd : !odd;
  }
  if (name == "false") return a.is_bool() && !a.boolean();
  if (name == "true") return a.is_bool() && a.boolean();
  if (name == "none") return a.is_null();
  if (name == "string") return a.is_string();
  if (name == "number") return a.is_number();
  if (name == "integer") return a.is_int();
  if (name == "iterable") return (a.is_array() && !a.is_tuple()) || a.is_string();
  if (name == "mapping") return a.is_object();
  if (name == "sequence") return a.is_array() || a.is_object() || a.is_string();
  if (name == "lower") return a.is_string() && a.str() == JsToLower(a.str());
  if (name == "upper") return a.is_string() && a.str() == JsToUpper(a.str());
  if (name == "defined") return !a.is_undefined();
  if (name == "undefined") return a.is_undefined();
  if (name == "equalto" || name == "eq") {
    if (b == nullptr) {
      return Error(absl::StrCat("test '", name, "' needs a value to compare with"));
    }
    return StrictEquals(a, *b);
  }
  return absl::NotFoundError(name);
}

bool IsKnownTest(absl::string_view name) {
  return !absl::IsNotFound(RunTest(name, Value::Int(0), nullptr).status());
}

// The argument at `index`, or else the keyword argument `key`, or else null.
const Value* ArgOrKwarg(const std::vector<Value>& args, size_t index, const OrderedMap& kwargs,
                        absl::string_view key) {
  if (index < args.size()) return &args[index];
  return kwargs.Find(key);
}

// JavaScript truthiness of a raw value (`if (x.value)`): objects are true.
bool RawTruthy(const Value& v) {
  switch (v.type()) {
    case Value::Type::kArray:
    case Value::Type::kObject:
    case Value::Type::kNamespace:
      return true;
    default:
      return Truthy(v);
  }
}

// A number argument of range(): raw JavaScript value, or nullopt for undefined.
absl::StatusOr<std::optional<double>> RangeArg(const std::vector<Value>& args, size_t i) {
  if (i >= args.size() || args[i].is_undefined() || args[i].is_null()) {
    return std::optional<double>();  // none's raw value is undefined too
  }
  if (!args[i].is_number()) {
    return Unsupported(absl::StrCat("range() argument of type ", TypeName(args[i])));
  }
  return std::optional<double>(args[i].number());
}

class Interpreter {
 public:
  explicit Interpreter(const JinjaLimits& limits) : limits_(limits) {}

  absl::StatusOr<std::string> Run(const Node& program, const Value& context);

 private:
  absl::StatusOr<std::string> RunProgram(const Node& program, const Value& context);

  class DepthGuard {
   public:
    explicit DepthGuard(Interpreter* in) : in_(in) { ++in_->depth_; }
    ~DepthGuard() { --in_->depth_; }

   private:
    Interpreter* in_;
  };

  // Scopes that a macro may capture live until the render ends.
  absl::StatusOr<Env*> NewEnv(Env* parent) {
    if (envs_.size() >= limits_.max_scopes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("rendering creates more than ", limits_.max_scopes, " scopes"));
    }
    envs_.emplace_back();
    envs_.back().parent = parent;
    return &envs_.back();
  }

  // Bounds recursion: by count (max_depth) and by the stack it uses (max_stack_bytes).
  absl::Status CheckNesting(const Node& n) {
    const char* frame = static_cast<const char*>(__builtin_frame_address(0));
    const size_t used =
        static_cast<size_t>(stack_base_ > frame ? stack_base_ - frame : frame - stack_base_);
    if (depth_ > limits_.max_depth || used > limits_.max_stack_bytes) {
      return Positioned(absl::ResourceExhaustedError(absl::StrCat(
                            "rendering nests more than ", limits_.max_depth, " evaluations or ",
                            limits_.max_stack_bytes, " bytes of stack (runaway recursion?)")),
                        n);
    }
    return absl::OkStatus();
  }

  // Bounds the nesting of built values, so that freeing them cannot overflow the stack.
  absl::Status CheckValueDepth(const Value& v, const Node& n) {
    if (v.depth() > kMaxValueDepth) {
      return Positioned(
          absl::ResourceExhaustedError(absl::StrCat("rendering builds values nested deeper than ",
                                                    kMaxValueDepth, " levels")),
          n);
    }
    return absl::OkStatus();
  }

  absl::Status Step() {
    if (++steps_ > limits_.max_steps) {
      return absl::ResourceExhaustedError(
          absl::StrCat("rendering takes more than ", limits_.max_steps, " steps"));
    }
    return absl::OkStatus();
  }

  // Bounds the size of a string being built.
  absl::Status CheckSize(size_t bytes) const {
    if (bytes > limits_.max_output_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat("rendering builds a string longer than ",
                                                       limits_.max_output_bytes, " bytes"));
    }
    return absl::OkStatus();
  }

  // Accounts for `bytes` just copied into a string (bounding its size and the total copied).
  absl::Status Charge(size_t bytes) {
    SPLITMOE_RETURN_IF_ERROR(CheckSize(bytes));
    copied_ += static_cast<int64_t>(bytes);
    if (copied_ > limits_.max_copied_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("rendering copies more than ", limits_.max_copied_bytes, " bytes"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Value> MakeString(std::string s) {
    SPLITMOE_RETURN_IF_ERROR(Charge(s.size()));
    return Value::String(std::move(s));
  }

  absl::Status CheckLength(size_t n) {
    if (n > limits_.max_sequence_length) {
      return absl::ResourceExhaustedError(absl::StrCat("rendering builds a sequence longer than ",
                                                       limits_.max_sequence_length, " elements"));
    }
    return absl::OkStatus();
  }

  // Appends the node's position to errors that lack one.
  absl::Status Positioned(const absl::Status& s, const Node& n) {
    if (s.ok() || !ControlKind(s).empty() || s.GetPayload(kPositionedPayload) ||
        s.GetPayload(kRaisedPayload)) {
      return s;
    }
    absl::Status out(s.code(), absl::StrCat(s.message(), " at line ", n.line, " col ", n.column));
    out.SetPayload(kPositionedPayload, absl::Cord("1"));
    return out;
  }

  Value Lookup(Env* env, const std::string& name) const;
  void DefineGlobals(Env* root);

  absl::StatusOr<Value> Evaluate(const Node* n, Env* env);
  absl::StatusOr<Value> EvaluateNode(const Node& n, Env* env);
  absl::StatusOr<std::string> RenderBlock(const std::vector<NodePtr>& statements, Env* env);
  absl::StatusOr<std::string> RenderIf(const Node& n, Env* env);
  absl::StatusOr<std::string> RenderFor(const Node& n, Env* env);
  absl::Status BindLoopVariable(const Node& loopvar, const Value& current, Env* scope);
  absl::Status ExecuteSet(const Node& n, Env* env);
  absl::StatusOr<Value> EvaluateBinary(const Node& n, Env* env);
  absl::StatusOr<Value> EvaluateMember(const Node& n, Env* env, Value* object_out);
  absl::StatusOr<Value> EvaluateSlice(const Value& object, const Node& slice, Env* env);
  absl::StatusOr<Value> EvaluateCall(const Node& n, Env* env);
  absl::StatusOr<std::vector<Value>> EvaluateCallArguments(const std::vector<NodePtr>& args,
                                                           Env* env);
  absl::Status EvaluateArguments(const std::vector<NodePtr>& args, Env* env,
                                 std::vector<Value>* positional, OrderedMap* kwargs);
  absl::StatusOr<Value> EvaluateTest(const Node& n, Env* env);
  absl::StatusOr<Value> EvaluateUnary(const Node& n, Env* env);
  absl::StatusOr<Value> DefineMacro(const Node& n, Env* env);
  absl::StatusOr<Value> EvaluateCallStatement(const Node& n, Env* env);
  absl::Status BindMacroArguments(const std::string& display, const std::vector<NodePtr>& params,
                                  const SpecialArgs& special, std::vector<Value> args, Env* scope);
  absl::StatusOr<Value> ApplyFilter(const Value& operand, const Node& filter, Env* env);
  absl::StatusOr<Value> ApplyPlainFilter(const Value& operand, const std::string& name, Env* env);
  absl::StatusOr<Value> ApplyCallFilter(const Value& operand, const Node& filter, Env* env);

  // Builtin properties and methods (RuntimeValue.builtins) of `object`; nullopt when none.
  std::optional<Value> Builtin(const Value& object, const std::string& name);
  std::optional<Value> StringBuiltin(const Value& object, const std::string& name);
  std::optional<Value> ObjectBuiltin(const Value& object, const std::string& name);

  absl::StatusOr<Value> Range(const std::vector<Value>& args);

  const JinjaLimits& limits_;
  std::deque<Env> envs_;
  Value namespace_builtin_;
  // Every namespace created: a template can make one hold itself (`set ns.me = ns`).
  std::vector<Value> namespaces_;
  const char* stack_base_ = nullptr;  // the frame of Run()
  int depth_ = 0;
  int64_t steps_ = 0;
  int64_t copied_ = 0;
};

Value Interpreter::Lookup(Env* env, const std::string& name) const {
  if (name == "namespace") {
    // Every scope holds `namespace`: the innermost one answers.
    auto it = env->vars.find(name);
    return it != env->vars.end() ? it->second : namespace_builtin_;
  }
  for (Env* e = env; e != nullptr; e = e->parent) {
    auto it = e->vars.find(name);
    if (it != e->vars.end()) return it->second;
  }
  return Value::Undefined();
}

absl::StatusOr<Value> Interpreter::Range(const std::vector<Value>& args) {
  if (!args.empty() && args.back().is_kwargs()) {
    return Unsupported("keyword arguments to range()");
  }
  SPLITMOE_ASSIGN_OR_RETURN(std::optional<double> start, RangeArg(args, 0));
  SPLITMOE_ASSIGN_OR_RETURN(std::optional<double> stop, RangeArg(args, 1));
  SPLITMOE_ASSIGN_OR_RETURN(std::optional<double> step_arg, RangeArg(args, 2));
  if (!stop) {
    stop = start;
    start = 0.0;
  }
  const double step = step_arg.value_or(1);
  if (step == 0) return Error("range() step must not be zero");
  std::vector<Value> out;
  if (!start || !stop) return Value::Array(std::move(out));  // comparisons with undefined fail
  const double count = step > 0 ? (*stop - *start) / step : (*start - *stop) / -step;
  if (count > static_cast<double>(limits_.max_sequence_length)) {
    SPLITMOE_RETURN_IF_ERROR(CheckLength(limits_.max_sequence_length + 1));
  }
  auto push = [&](double i) -> absl::Status {
    out.push_back(std::trunc(i) == i ? Value::Int(i) : Value::Float(i));
    return CheckLength(out.size());  // a step too small to change `i` never ends
  };
  // Floating-point counters, as JavaScript's range: push() bounds the iterations.
  if (step > 0) {
    // NOLINTNEXTLINE(clang-analyzer-security.FloatLoopCounter)
    for (double i = *start; i < *stop; i += step) {
      SPLITMOE_RETURN_IF_ERROR(push(i));
    }
  } else {
    // NOLINTNEXTLINE(clang-analyzer-security.FloatLoopCounter)
    for (double i = *start; i > *stop; i += step) {
      SPLITMOE_RETURN_IF_ERROR(push(i));
    }
  }
  return Value::Array(std::move(out));
}

void Interpreter::DefineGlobals(Env* root) {
  namespace_builtin_ =
      Value::Function("namespace", [this](std::vector<Value>& args, Env*) -> absl::StatusOr<Value> {
        std::vector<Value> positional = args;
        OrderedMap entries;
        std::optional<Value> kwargs;
        if (!positional.empty() && positional.back().is_kwargs()) {
          kwargs = positional.back();
          positional.pop_back();
        }
        if (positional.size() > 1) {
          return Error(
              absl::StrCat("namespace expected at most 1 argument, got ", positional.size()));
        }
        if (positional.size() == 1) {
          const Value& source = positional[0];
          if (source.is_object()) {
            for (const auto& [k, v] : source.map().entries()) entries.Set(k, v);
          } else if (source.is_array()) {
            for (const Value& pair : source.items()) {
              std::vector<Value> kv;
              if (pair.is_array()) {
                kv = pair.items();
              } else if (pair.is_string()) {
                for (std::string& c : CodePoints(pair.str()))
                  kv.push_back(Value::String(std::move(c)));
              }
              if (kv.size() != 2) {
                return Error("namespace expected an object or an iterable of [key, value] pairs");
              }
              if (!kv[0].is_string()) return Error("namespace keys must be strings");
              entries.Set(kv[0].str(), kv[1]);
            }
          } else {
            return Error(absl::StrCat("'", TypeName(source), "' object is not iterable"));
          }
        }
        if (kwargs) {
          for (const auto& [k, v] : kwargs->map().entries()) entries.Set(k, v);
        }
        Value ns = Value::Namespace(std::move(entries));
        namespaces_.push_back(ns);  // emptied when the render ends: breaks reference cycles
        return ns;
      });
  root->vars["false"] = Value::Bool(false);
  root->vars["true"] = Value::Bool(true);
  root->vars["none"] = Value::Null();
  root->vars["raise_exception"] = Value::Function(
      "raise_exception", [](std::vector<Value>& args, Env*) -> absl::StatusOr<Value> {
        // new Error(message): String(message), "" when absent.
        std::string message;  // none's raw value is undefined too
        if (!args.empty() && !args[0].is_undefined() && !args[0].is_null()) {
          SPLITMOE_ASSIGN_OR_RETURN(message, JsRawToString(args[0]));
        }
        absl::Status s = absl::InvalidArgumentError(message);
        s.SetPayload(kRaisedPayload, absl::Cord("1"));
        return s;
      });
  root->vars["range"] =
      Value::Function("range", [this](std::vector<Value>& args, Env*) { return Range(args); });
  root->vars["strftime_now"] =
      Value::Function("strftime_now", [](std::vector<Value>& args, Env*) -> absl::StatusOr<Value> {
        if (args.empty() || !args[0].is_string()) {
          return Error("strftime_now() takes a format string");
        }
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        localtime_r(&now, &tm);
        static constexpr const char* kMonths[] = {"January",   "February", "March",    "April",
                                                  "May",       "June",     "July",     "August",
                                                  "September", "October",  "November", "December"};
        auto pad2 = [](int n) { return n < 10 ? absl::StrCat("0", n) : absl::StrCat(n); };
        const std::string& format = args[0].str();
        std::string out;
        for (size_t i = 0; i < format.size(); ++i) {
          if (format[i] != '%' || i + 1 >= format.size()) {
            out.push_back(format[i]);
            continue;
          }
          const char c = format[i + 1];
          std::string piece;
          switch (c) {
            case 'Y':
              piece = absl::StrCat(tm.tm_year + 1900);
              break;
            case 'm':
              piece = pad2(tm.tm_mon + 1);
              break;
            case 'd':
              piece = pad2(tm.tm_mday);
              break;
            case 'b':
              piece = std::string(kMonths[tm.tm_mon]).substr(0, 3);
              break;
            case 'B':
              piece = kMonths[tm.tm_mon];
              break;
            case 'H':
              piece = pad2(tm.tm_hour);
              break;
            case 'M':
              piece = pad2(tm.tm_min);
              break;
            case '%':
              piece = "%";
              break;
            default:
              out.push_back('%');
              continue;
          }
          out += piece;
          ++i;
        }
        return Value::String(std::move(out));
      });
  root->vars["True"] = Value::Bool(true);
  root->vars["False"] = Value::Bool(false);
  root->vars["None"] = Value::Null();
}

absl::StatusOr<std::string> Interpreter::Run(const Node& program, const Value& context) {
  stack_base_ = static_cast<const char*>(__builtin_frame_address(0));
  absl::StatusOr<std::string> out = RunProgram(program, context);
  for (const Value& ns : namespaces_) ns.mutable_map() = OrderedMap();
  return out;
}

absl::StatusOr<std::string> Interpreter::RunProgram(const Node& program, const Value& context) {
  SPLITMOE_ASSIGN_OR_RETURN(Env * root, NewEnv(nullptr));
  DefineGlobals(root);
  if (context.is_object()) {
    for (const auto& [name, value] : context.map().entries()) {
      if (name == "namespace" || root->vars.contains(name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "context variable '", name, "' is already declared (a builtin of the template)"));
      }
      root->vars[name] = value;
    }
  } else if (!context.is_null() && !context.is_undefined()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the render context must be a JSON object, got ", TypeName(context)));
  }
  absl::StatusOr<std::string> out = RenderBlock(program.list, root);
  if (!out.ok()) {
    const std::string control = ControlKind(out.status());
    if (!control.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("'", control, "' outside of a for loop"));
    }
    absl::Status s = out.status();
    s.ErasePayload(kPositionedPayload);
    return s;
  }
  return out;
}

absl::StatusOr<Value> Interpreter::Evaluate(const Node* n, Env* env) {
  if (n == nullptr) return Value::Undefined();
  DepthGuard guard(this);
  SPLITMOE_RETURN_IF_ERROR(CheckNesting(*n));
  SPLITMOE_RETURN_IF_ERROR(Step());
  absl::StatusOr<Value> v = EvaluateNode(*n, env);
  if (!v.ok()) return Positioned(v.status(), *n);
  SPLITMOE_RETURN_IF_ERROR(CheckValueDepth(*v, *n));
  return v;
}

absl::StatusOr<Value> Interpreter::EvaluateNode(const Node& n, Env* env) {
  switch (n.kind) {
    case NodeKind::kIdentifier:
      return Lookup(env, n.name);
    case NodeKind::kInt:
      return Value::Int(n.number);
    case NodeKind::kFloat:
      return Value::Float(n.number);
    case NodeKind::kString:
    case NodeKind::kText:
      return Value::String(n.name);
    case NodeKind::kBinary:
      return EvaluateBinary(n, env);
    case NodeKind::kMember:
      return EvaluateMember(n, env, nullptr);
    case NodeKind::kCall:
      return EvaluateCall(n, env);
    case NodeKind::kFilter: {
      SPLITMOE_ASSIGN_OR_RETURN(Value operand, Evaluate(n.a.get(), env));
      return ApplyFilter(operand, *n.b, env);
    }
    case NodeKind::kTest:
      return EvaluateTest(n, env);
    case NodeKind::kTernary: {
      SPLITMOE_ASSIGN_OR_RETURN(Value cond, Evaluate(n.a.get(), env));
      return Evaluate(Truthy(cond) ? n.b.get() : n.c.get(), env);
    }
    case NodeKind::kUnary:
      return EvaluateUnary(n, env);
    case NodeKind::kArray:
    case NodeKind::kTuple: {
      std::vector<Value> items;
      items.reserve(n.list.size());
      for (const NodePtr& e : n.list) {
        SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(e.get(), env));
        items.push_back(std::move(v));
      }
      return Value::Array(std::move(items), n.kind == NodeKind::kTuple);
    }
    case NodeKind::kObject: {
      OrderedMap map;
      for (size_t i = 0; i < n.list.size(); ++i) {
        SPLITMOE_ASSIGN_OR_RETURN(Value key, Evaluate(n.list[i].get(), env));
        if (!key.is_string()) {
          return Error(absl::StrCat("Object keys must be strings: got ", TypeName(key)));
        }
        SPLITMOE_ASSIGN_OR_RETURN(Value value, Evaluate(n.list2[i].get(), env));
        map.Set(key.str(), std::move(value));
      }
      return Value::Object(std::move(map));
    }
    case NodeKind::kSelect: {
      SPLITMOE_ASSIGN_OR_RETURN(Value cond, Evaluate(n.b.get(), env));
      if (!Truthy(cond)) return Value::Undefined();
      return Evaluate(n.a.get(), env);
    }
    case NodeKind::kIf: {
      SPLITMOE_ASSIGN_OR_RETURN(std::string s, RenderIf(n, env));
      return Value::String(std::move(s));
    }
    case NodeKind::kFor: {
      SPLITMOE_ASSIGN_OR_RETURN(std::string s, RenderFor(n, env));
      return Value::String(std::move(s));
    }
    case NodeKind::kSet:
      SPLITMOE_RETURN_IF_ERROR(ExecuteSet(n, env));
      return Value::Null();
    case NodeKind::kMacro:
      return DefineMacro(n, env);
    case NodeKind::kCallStatement:
      return EvaluateCallStatement(n, env);
    case NodeKind::kFilterStatement: {
      SPLITMOE_ASSIGN_OR_RETURN(std::string body, RenderBlock(n.list, env));
      return ApplyFilter(Value::String(std::move(body)), *n.a, env);
    }
    case NodeKind::kComment:
      return Value::Null();
    case NodeKind::kBreak:
      return ControlSignal("break");
    case NodeKind::kContinue:
      return ControlSignal("continue");
    case NodeKind::kProgram: {
      SPLITMOE_ASSIGN_OR_RETURN(std::string s, RenderBlock(n.list, env));
      return Value::String(std::move(s));
    }
    case NodeKind::kSlice:
    case NodeKind::kKeywordArg:
    case NodeKind::kSpread:
    case NodeKind::kKeywordSpread:
      break;
  }
  return Error("misplaced slice, keyword argument or argument unpacking");
}

absl::StatusOr<std::string> Interpreter::RenderBlock(const std::vector<NodePtr>& statements,
                                                     Env* env) {
  if (!statements.empty()) SPLITMOE_RETURN_IF_ERROR(CheckNesting(*statements.front()));
  std::string result;
  for (const NodePtr& statement : statements) {
    const Node& s = *statement;
    const size_t before = result.size();
    switch (s.kind) {
      case NodeKind::kText:
        result += s.name;
        break;
      case NodeKind::kIf: {
        SPLITMOE_RETURN_IF_ERROR(Step());
        absl::StatusOr<std::string> r = RenderIf(s, env);
        if (!r.ok()) return Positioned(r.status(), s);
        result += *r;
        break;
      }
      case NodeKind::kFor: {
        SPLITMOE_RETURN_IF_ERROR(Step());
        absl::StatusOr<std::string> r = RenderFor(s, env);
        if (!r.ok()) return Positioned(r.status(), s);
        result += *r;
        break;
      }
      case NodeKind::kSet: {
        SPLITMOE_RETURN_IF_ERROR(Step());
        absl::Status r = ExecuteSet(s, env);
        if (!r.ok()) return Positioned(r, s);
        break;
      }
      case NodeKind::kComment:
        break;
      default: {
        SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(&s, env));
        if (!v.is_null() && !v.is_undefined()) {
          absl::StatusOr<std::string> text = RuntimeToString(v, limits_.max_output_bytes);
          if (!text.ok()) return Positioned(text.status(), s);
          result += *text;
        }
      }
    }
    SPLITMOE_RETURN_IF_ERROR(CheckSize(result.size()));
    SPLITMOE_RETURN_IF_ERROR(Charge(result.size() - before));
  }
  return result;
}

absl::StatusOr<std::string> Interpreter::RenderIf(const Node& n, Env* env) {
  SPLITMOE_ASSIGN_OR_RETURN(Value test, Evaluate(n.a.get(), env));
  return RenderBlock(Truthy(test) ? n.list : n.list2, env);
}

absl::Status Interpreter::BindLoopVariable(const Node& loopvar, const Value& current, Env* scope) {
  if (loopvar.kind == NodeKind::kIdentifier) {
    scope->vars[loopvar.name] = current;
    return absl::OkStatus();
  }
  for (size_t j = 0; j < loopvar.list.size(); ++j) {
    const Node& target = *loopvar.list[j];
    if (target.kind != NodeKind::kIdentifier) {
      return Error("Cannot unpack non-identifier type in a for loop");
    }
    scope->vars[target.name] = j < current.items().size() ? current.items()[j] : Value::Undefined();
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Interpreter::RenderFor(const Node& n, Env* env) {
  SPLITMOE_ASSIGN_OR_RETURN(Env * scope, NewEnv(env));
  const Node* test = nullptr;
  Value iterable;
  if (n.b->kind == NodeKind::kSelect) {
    SPLITMOE_ASSIGN_OR_RETURN(iterable, Evaluate(n.b->a.get(), scope));
    test = n.b->b.get();
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(iterable, Evaluate(n.b.get(), scope));
  }
  std::vector<Value> candidates;
  if (iterable.is_array()) {
    candidates = iterable.items();
  } else if (iterable.is_object()) {
    for (const auto& [k, v] : iterable.map().entries()) candidates.push_back(Value::String(k));
  } else {
    return Error(
        absl::StrCat("Expected iterable or object type in for loop: got ", TypeName(iterable)));
  }
  const Node& loopvar = *n.a;
  std::vector<Value> items;
  if (loopvar.kind == NodeKind::kIdentifier && test == nullptr) {
    items = std::move(candidates);
  } else {
    for (const Value& current : candidates) {
      if (loopvar.kind == NodeKind::kTuple) {
        if (!current.is_array() || current.is_tuple()) {
          return Error(absl::StrCat("Cannot unpack non-iterable type: ", TypeName(current)));
        }
        const size_t expected = loopvar.list.size();
        const size_t actual = current.items().size();
        if (expected != actual) {
          return Error(
              absl::StrCat("Too ", expected > actual ? "few" : "many", " items to unpack"));
        }
      }
      if (test != nullptr) {
        SPLITMOE_RETURN_IF_ERROR(Step());
        Env loop_scope;  // a condition cannot capture its scope: no need to keep it
        loop_scope.parent = scope;
        SPLITMOE_RETURN_IF_ERROR(BindLoopVariable(loopvar, current, &loop_scope));
        SPLITMOE_ASSIGN_OR_RETURN(Value keep, Evaluate(test, &loop_scope));
        if (!Truthy(keep)) continue;
      }
      items.push_back(current);
    }
  }

  std::string result;
  bool no_iteration = true;
  const size_t count = items.size();
  for (size_t i = 0; i < count; ++i) {
    SPLITMOE_RETURN_IF_ERROR(Step());
    OrderedMap loop;
    const double index = static_cast<double>(i);
    const double length = static_cast<double>(count);
    loop.Set("index", Value::Int(index + 1));
    loop.Set("index0", Value::Int(index));
    loop.Set("revindex", Value::Int(length - index));
    loop.Set("revindex0", Value::Int(length - index - 1));
    loop.Set("first", Value::Bool(i == 0));
    loop.Set("last", Value::Bool(i + 1 == count));
    loop.Set("length", Value::Int(length));
    loop.Set("previtem", i > 0 ? items[i - 1] : Value::Undefined());
    loop.Set("nextitem", i + 1 < count ? items[i + 1] : Value::Undefined());
    scope->vars["loop"] = Value::Object(std::move(loop), ObjectKind::kLoop);
    SPLITMOE_RETURN_IF_ERROR(BindLoopVariable(loopvar, items[i], scope));
    absl::StatusOr<std::string> body = RenderBlock(n.list, scope);
    if (!body.ok()) {
      // As the reference: an iteration cut short by break/continue contributes no output, and
      // does not count as an iteration for the else block.
      const std::string control = ControlKind(body.status());
      if (control == "continue") continue;
      if (control == "break") break;
      return body.status();
    }
    result += *body;
    SPLITMOE_RETURN_IF_ERROR(CheckSize(result.size()));
    SPLITMOE_RETURN_IF_ERROR(Charge(body->size()));
    no_iteration = false;
  }
  if (no_iteration) {
    SPLITMOE_ASSIGN_OR_RETURN(std::string otherwise, RenderBlock(n.list2, scope));
    result += otherwise;
  }
  return result;
}

absl::Status Interpreter::ExecuteSet(const Node& n, Env* env) {
  Value rhs;
  if (n.b) {
    SPLITMOE_ASSIGN_OR_RETURN(rhs, Evaluate(n.b.get(), env));
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(std::string body, RenderBlock(n.list, env));
    rhs = Value::String(std::move(body));
  }
  const Node& target = *n.a;
  switch (target.kind) {
    case NodeKind::kIdentifier:
      env->vars[target.name] = std::move(rhs);
      return absl::OkStatus();
    case NodeKind::kTuple: {
      if (!rhs.is_array()) {
        return Error(absl::StrCat("Cannot unpack non-iterable type in set: ", TypeName(rhs)));
      }
      const size_t expected = target.list.size();
      const size_t actual = rhs.items().size();
      if (expected != actual) {
        return Error(
            absl::StrCat("Too ", expected > actual ? "few" : "many", " items to unpack in set"));
      }
      for (size_t i = 0; i < expected; ++i) {
        if (target.list[i]->kind != NodeKind::kIdentifier) {
          return Error("Cannot unpack to non-identifier in set");
        }
        env->vars[target.list[i]->name] = rhs.items()[i];
      }
      return absl::OkStatus();
    }
    case NodeKind::kMember: {
      SPLITMOE_ASSIGN_OR_RETURN(Value object, Evaluate(target.a.get(), env));
      if (!object.is_namespace()) {
        return Error(absl::StrCat("cannot assign attribute on non-namespace object (",
                                  TypeName(object), ")"));
      }
      // As the reference, `ns[name] = v` sets the attribute called "name".
      if (target.b->kind != NodeKind::kIdentifier) {
        return Error("Cannot assign to member with non-identifier property");
      }
      object.NoteAssigned(rhs.depth());
      SPLITMOE_RETURN_IF_ERROR(CheckValueDepth(object, n));
      object.mutable_map().Set(target.b->name, std::move(rhs));
      return absl::OkStatus();
    }
    default:
      return Error("Invalid left-hand side of an assignment");
  }
}

absl::StatusOr<Value> Interpreter::EvaluateBinary(const Node& n, Env* env) {
  const std::string& op = n.name;
  SPLITMOE_ASSIGN_OR_RETURN(Value left, Evaluate(n.a.get(), env));
  if (op == "and") return Truthy(left) ? Evaluate(n.b.get(), env) : absl::StatusOr<Value>(left);
  if (op == "or") return Truthy(left) ? absl::StatusOr<Value>(left) : Evaluate(n.b.get(), env);
  SPLITMOE_ASSIGN_OR_RETURN(Value right, Evaluate(n.b.get(), env));
  if (op == "==" || op == "!=") {
    SPLITMOE_ASSIGN_OR_RETURN(const bool equal, LooseEquals(left, right));
    return Value::Bool(op == "==" ? equal : !equal);
  }

  if (left.is_number() && right.is_number() && op != "~" && op != "**") {
    const double a = left.number();
    const double b = right.number();
    const bool is_float = left.is_float() || right.is_float();
    auto num = [&](double r) { return is_float ? Value::Float(r) : Value::Int(r); };
    if (op == "+") return num(a + b);
    if (op == "-") return num(a - b);
    if (op == "*") return num(a * b);
    if (op == "/") return Value::Float(a / b);
    if (op == "//") return num(std::floor(a / b));
    if (op == "%") return num(std::fmod(a, b));
    if (op == "<") return Value::Bool(a < b);
    if (op == ">") return Value::Bool(a > b);
    if (op == ">=") return Value::Bool(a >= b);
    if (op == "<=") return Value::Bool(a <= b);
  } else if (left.is_undefined() || right.is_undefined()) {
    if (right.is_undefined() && (op == "in" || op == "not in")) {
      return Value::Bool(op == "not in");
    }
    if (op == "~" && !left.is_null() && !right.is_null()) {
      std::string l, r;
      if (!left.is_undefined()) {
        SPLITMOE_ASSIGN_OR_RETURN(l, JsRawToString(left, limits_.max_output_bytes));
      }
      if (!right.is_undefined()) {
        SPLITMOE_ASSIGN_OR_RETURN(r, JsRawToString(right, limits_.max_output_bytes));
      }
      return MakeString(absl::StrCat(l, r));
    }
    return Error(absl::StrCat("Cannot perform operation ", op, " on undefined values"));
  } else if (left.is_null() || right.is_null()) {
    return Error(absl::StrCat("Cannot perform operation ", op, " on null values"));
  } else if (op == "~") {
    SPLITMOE_ASSIGN_OR_RETURN(std::string l, JsRawToString(left, limits_.max_output_bytes));
    SPLITMOE_ASSIGN_OR_RETURN(std::string r, JsRawToString(right, limits_.max_output_bytes));
    return MakeString(absl::StrCat(l, r));
  } else if (op == "**" && IsNumericLike(left) && IsNumericLike(right)) {
    const double a = NumericValue(left);
    const double b = NumericValue(right);
    if (a == 0 && b < 0) return Error("0.0 cannot be raised to a negative power");
    SPLITMOE_ASSIGN_OR_RETURN(const double result, JsPow(a, b));
    if (!std::isfinite(result)) return Error("Exponentiation result is not a finite real number");
    if (left.is_float() || right.is_float() || b < 0) return Value::Float(result);
    return Value::Int(result);
  } else if (left.is_array() && right.is_array()) {
    if (op == "+") {
      const size_t total = left.items().size() + right.items().size();
      SPLITMOE_RETURN_IF_ERROR(CheckLength(total));
      SPLITMOE_RETURN_IF_ERROR(Charge(total * sizeof(Value) / 8));
      std::vector<Value> items = left.items();
      items.insert(items.end(), right.items().begin(), right.items().end());
      return Value::Array(std::move(items));
    }
  } else if (right.is_array()) {
    bool member = false;
    for (const Value& x : right.items()) {
      if (StrictEquals(x, left)) {
        member = true;
        break;
      }
    }
    if (op == "in") return Value::Bool(member);
    if (op == "not in") return Value::Bool(!member);
  }

  if ((left.is_string() || right.is_string()) && op == "+") {
    SPLITMOE_ASSIGN_OR_RETURN(std::string l, JsRawToString(left, limits_.max_output_bytes));
    SPLITMOE_ASSIGN_OR_RETURN(std::string r, JsRawToString(right, limits_.max_output_bytes));
    return MakeString(absl::StrCat(l, r));
  }
  if (left.is_string() && right.is_string() && (op == "in" || op == "not in")) {
    const bool found = right.str().find(left.str()) != std::string::npos;
    return Value::Bool(op == "in" ? found : !found);
  }
  if (left.is_string() && right.is_object() && (op == "in" || op == "not in")) {
    const bool found = right.map().Find(left.str()) != nullptr;
    return Value::Bool(op == "in" ? found : !found);
  }
  return Error(absl::StrCat("Unknown operator \"", op, "\" between ", TypeName(left), " and ",
                            TypeName(right)));
}

std::optional<Value> Interpreter::StringBuiltin(const Value& object, const std::string& name) {
  const Value self = object;
  using Args = std::vector<Value>;
  auto method = [&](auto fn) {
    return Value::Function(absl::StrCat("method '", name, "' of a string"),
                           [this, self, fn](Args& args, Env*) -> absl::StatusOr<Value> {
                             return fn(this, self.str(), args);
                           });
  };
  if (name == "length") return Value::Int(static_cast<double>(Utf16Length(object.str())));
  if (name == "upper") {
    return method(
        [](Interpreter* in, const std::string& s, Args&) { return in->MakeString(JsToUpper(s)); });
  }
  if (name == "lower") {
    return method(
        [](Interpreter* in, const std::string& s, Args&) { return in->MakeString(JsToLower(s)); });
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    // As the reference: arguments (the characters to strip) are ignored.
    const int which = name == "strip" ? 0 : name == "lstrip" ? 1 : 2;
    return method([which](Interpreter*, const std::string& s, Args&) -> absl::StatusOr<Value> {
      absl::string_view r = which == 0 ? JsTrim(s) : which == 1 ? JsTrimStart(s) : JsTrimEnd(s);
      return Value::String(std::string(r));
    });
  }
  if (name == "title") {
    return method([](Interpreter* in, const std::string& s, Args&) {
      // s.replace(/\b\w/g, c => c.toUpperCase()): ASCII word characters only.
      std::string out = s;
      auto word = [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               c == '_';
      };
      for (size_t i = 0; i < out.size(); ++i) {
        if (word(out[i]) && (i == 0 || !word(out[i - 1])) && out[i] >= 'a' && out[i] <= 'z') {
          out[i] = static_cast<char>(out[i] - 32);
        }
      }
      return in->MakeString(std::move(out));
    });
  }
  if (name == "capitalize") {
    return method([](Interpreter* in, const std::string& s, Args&) {
      // charAt(0).toUpperCase() + slice(1): one UTF-16 unit, so a character past U+FFFF stays.
      if (s.empty()) return in->MakeString(std::string());
      size_t i = 0;
      const char32_t first = NextCodePoint(s, &i);
      if (first >= 0x10000) return in->MakeString(s);
      return in->MakeString(JsToUpper(s.substr(0, i)) + s.substr(i));
    });
  }
  if (name == "startswith" || name == "endswith") {
    const bool starts = name == "startswith";
    return method([starts](Interpreter*, const std::string& s,
                           Args& args) -> absl::StatusOr<Value> {
      const char* fname = starts ? "startswith()" : "endswith()";
      if (args.empty()) return Error(absl::StrCat(fname, " requires at least one argument"));
      auto test = [&](const std::string& p) {
        return starts ? absl::string_view(s).substr(0, p.size()) == p
                      : s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
      };
      if (args[0].is_string()) return Value::Bool(test(args[0].str()));
      if (args[0].is_array()) {
        for (const Value& item : args[0].items()) {
          if (!item.is_string())
            return Error(absl::StrCat(fname, " tuple elements must be strings"));
          if (test(item.str())) return Value::Bool(true);
        }
        return Value::Bool(false);
      }
      return Error(absl::StrCat(fname, " argument must be a string or tuple of strings"));
    });
  }
  if (name == "split") {
    return method([](Interpreter* in, const std::string& s, Args& args) -> absl::StatusOr<Value> {
      const Value sep = args.size() > 0 ? args[0] : Value::Null();
      if (!sep.is_string() && !sep.is_null()) return Error("sep argument must be a string or null");
      const Value maxsplit = args.size() > 1 ? args[1] : Value::Int(-1);
      if (!maxsplit.is_int()) return Error("maxsplit argument must be a number");
      const double max = maxsplit.number();
      std::vector<std::string> parts;
      if (sep.is_null()) {
        const absl::string_view text = JsTrimStart(s);
        size_t i = 0;
        while (i < text.size()) {
          // Skip whitespace, then take the run of non-whitespace.
          size_t next = i;
          if (IsJsWhitespace(NextCodePoint(text, &next))) {
            i = next;
            continue;
          }
          const size_t begin = i;
          size_t end = i;
          while (end < text.size()) {
            size_t n2 = end;
            if (IsJsWhitespace(NextCodePoint(text, &n2))) break;
            end = n2;
          }
          if (max >= 0 && static_cast<double>(parts.size()) >= max) {
            parts.emplace_back(text.substr(begin));
            break;
          }
          parts.emplace_back(text.substr(begin, end - begin));
          i = end;
        }
      } else {
        const std::string& d = sep.str();
        if (d.empty()) return Error("empty separator");
        size_t begin = 0;
        while (true) {
          const size_t at = s.find(d, begin);
          if (at == std::string::npos) {
            parts.push_back(s.substr(begin));
            break;
          }
          parts.push_back(s.substr(begin, at - begin));
          begin = at + d.size();
        }
        if (max >= 0 && static_cast<double>(parts.size()) > max) {
          const size_t keep = static_cast<size_t>(max);
          std::string rest =
              absl::StrJoin(parts.begin() + static_cast<ptrdiff_t>(keep), parts.end(), d);
          parts.resize(keep);
          parts.push_back(std::move(rest));
        }
      }
      SPLITMOE_RETURN_IF_ERROR(in->CheckLength(parts.size()));
      std::vector<Value> out;
      out.reserve(parts.size());
      for (std::string& p : parts) out.push_back(Value::String(std::move(p)));
      return Value::Array(std::move(out));
    });
  }
  if (name == "replace") {
    return method([](Interpreter* in, const std::string& s, Args& args) -> absl::StatusOr<Value> {
      if (args.size() < 2) return Error("replace() requires at least two arguments");
      if (!args[0].is_string() || !args[1].is_string()) {
        return Error("replace() arguments must be strings");
      }
      Value count = Value::Null();
      if (args.size() > 2) {
        if (args[2].is_kwargs()) {
          const Value* c = args[2].map().Find("count");
          if (c != nullptr) count = *c;
        } else {
          count = args[2];
        }
      }
      if (!count.is_int() && !count.is_null()) {
        return Error("replace() count argument must be a number or null");
      }
      if (count.is_int() && count.number() == 0) return Value::String(s);
      double remaining = count.is_null() || count.number() < 0 ? HUGE_VAL : count.number();
      const std::string& from = args[0].str();
      const std::string& to = args[1].str();
      std::string out;
      if (from.empty()) {
        // (?=) with the u flag: before every code point and at the end.
        size_t i = 0;
        while (true) {
          if (remaining > 0) {
            out += to;
            --remaining;
          }
          if (i >= s.size()) break;
          const size_t start = i;
          NextCodePoint(s, &i);
          out.append(s, start, i - start);
          if (out.size() > in->limits_.max_output_bytes) break;
        }
      } else {
        size_t begin = 0;
        while (true) {
          const size_t at = s.find(from, begin);
          if (at == std::string::npos) break;
          out.append(s, begin, at - begin);
          if (remaining > 0) {
            out += to;
            --remaining;
          } else {
            out += from;
          }
          begin = at + from.size();
          if (out.size() > in->limits_.max_output_bytes) break;
        }
        out.append(s, begin, std::string::npos);
      }
      return in->MakeString(std::move(out));
    });
  }
  return std::nullopt;
}

std::optional<Value> Interpreter::ObjectBuiltin(const Value& object, const std::string& name) {
  const Value self = object;
  using Args = std::vector<Value>;
  if (name == "get") {
    return Value::Function(
        "method 'get' of an object",
        [self](Args& args, Env*) -> absl::StatusOr<Value> {
          if (args.empty() || !args[0].is_string()) {
            return Error(absl::StrCat("Object key must be a string: got ",
                                      args.empty() ? "undefined" : TypeName(args[0])));
          }
          if (const Value* v = self.map().Find(args[0].str())) return *v;
          if (args.size() > 1) return args[1];
          return Value::Null();
        },
        &self);
  }
  if (name == "items" || name == "keys" || name == "values") {
    const int which = name == "items" ? 0 : name == "keys" ? 1 : 2;
    return Value::Function(
        absl::StrCat("method '", name, "' of an object"),
        [self, which](Args&, Env*) -> absl::StatusOr<Value> {
          std::vector<Value> out;
          for (const auto& [k, v] : self.map().entries()) {
            if (which == 0) {
              out.push_back(Value::Array({Value::String(k), v}));
            } else if (which == 1) {
              out.push_back(Value::String(k));
            } else {
              out.push_back(v);
            }
          }
          return Value::Array(std::move(out));
        },
        &self);
  }
  if (name == "dictsort") {
    return Value::Function(
        "method 'dictsort' of an object",
        [self](Args& args, Env*) -> absl::StatusOr<Value> {
          OrderedMap kwargs;
          std::vector<Value> positional;
          for (const Value& a : args) {
            if (a.is_kwargs()) {
              kwargs = a.map();
            } else {
              positional.push_back(a);
            }
          }
          const Value* case_sensitive = ArgOrKwarg(positional, 0, kwargs, "case_sensitive");
          const Value cs = case_sensitive ? *case_sensitive : Value::Bool(false);
          if (!cs.is_bool()) return Error("case_sensitive must be a boolean");
          const Value* by_arg = ArgOrKwarg(positional, 1, kwargs, "by");
          const Value by = by_arg ? *by_arg : Value::String("key");
          if (!by.is_string()) return Error("by must be a string");
          if (by.str() != "key" && by.str() != "value") {
            return Error("by must be either 'key' or 'value'");
          }
          const Value* reverse_arg = ArgOrKwarg(positional, 2, kwargs, "reverse");
          const Value reverse = reverse_arg ? *reverse_arg : Value::Bool(false);
          if (!reverse.is_bool()) return Error("reverse must be a boolean");
          std::vector<Value> items;
          std::vector<Value> keys;
          for (const auto& [k, v] : self.map().entries()) {
            items.push_back(Value::Array({Value::String(k), v}));
            keys.push_back(by.str() == "key" ? Value::String(k) : v);
          }
          SPLITMOE_ASSIGN_OR_RETURN(std::vector<Value> sorted,
                                    SortByKeys(items, keys, cs.boolean(), reverse.boolean()));
          return Value::Array(std::move(sorted));
        },
        &self);
  }
  return std::nullopt;
}

std::optional<Value> Interpreter::Builtin(const Value& object, const std::string& name) {
  if (object.is_string()) return StringBuiltin(object, name);
  if (object.is_object()) return ObjectBuiltin(object, name);
  if (object.is_array() && name == "length") {
    return Value::Int(static_cast<double>(object.items().size()));
  }
  return std::nullopt;
}

absl::StatusOr<Value> Interpreter::EvaluateSlice(const Value& object, const Node& slice, Env* env) {
  if (!object.is_array() && !object.is_string()) {
    return Error("Slice object must be an array or string");
  }
  std::optional<double> parts[3];
  const Node* nodes[3] = {slice.a.get(), slice.b.get(), slice.c.get()};
  static constexpr const char* kNames[] = {"start", "stop", "step"};
  for (int i = 0; i < 3; ++i) {
    SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(nodes[i], env));
    if (v.is_int()) {
      parts[i] = v.number();
    } else if (!v.is_undefined()) {
      return Error(absl::StrCat("Slice ", kNames[i], " must be numeric or undefined"));
    }
  }
  if (object.is_array()) {
    const std::vector<Value>& items = object.items();
    std::vector<Value> out;
    for (size_t i : SliceIndices(items.size(), parts[0], parts[1], parts[2])) {
      out.push_back(items[i]);
    }
    return Value::Array(std::move(out));
  }
  const std::vector<std::string> chars = CodePoints(object.str());
  std::string out;
  for (size_t i : SliceIndices(chars.size(), parts[0], parts[1], parts[2])) out += chars[i];
  return MakeString(std::move(out));
}

absl::StatusOr<Value> Interpreter::EvaluateMember(const Node& n, Env* env, Value* object_out) {
  SPLITMOE_ASSIGN_OR_RETURN(Value object, Evaluate(n.a.get(), env));
  if (object_out != nullptr) *object_out = object;
  Value property;
  if (n.flag) {
    if (n.b->kind == NodeKind::kSlice) return EvaluateSlice(object, *n.b, env);
    SPLITMOE_ASSIGN_OR_RETURN(property, Evaluate(n.b.get(), env));
  } else if (n.b->kind == NodeKind::kInt) {
    property = Value::Int(n.b->number);
  } else {
    property = Value::String(n.b->name);
  }

  std::optional<Value> value;
  if (object.is_attribute_container()) {
    if (!property.is_string()) {
      return Error(
          absl::StrCat("Cannot access property with non-string: got ", TypeName(property)));
    }
    if (const Value* v = object.map().Find(property.str())) {
      value = *v;
    } else if (object.is_object()) {
      value = ObjectBuiltin(object, property.str());
    }
  } else if (object.is_array() || object.is_string()) {
    if (property.is_int()) {
      if (object.is_string()) {
        SPLITMOE_ASSIGN_OR_RETURN(std::optional<std::string> c,
                                  StringAt(object.str(), property.number()));
        if (c) value = Value::String(*std::move(c));
      } else {
        const double length = static_cast<double>(object.items().size());
        double k = std::isnan(property.number()) ? 0 : std::trunc(property.number());
        if (k < 0) k += length;
        if (k >= 0 && k < length) value = object.items()[static_cast<size_t>(k)];
      }
    } else if (property.is_string()) {
      value = Builtin(object, property.str());
    } else {
      return Error(absl::StrCat("Cannot access property with non-string/non-number: got ",
                                TypeName(property)));
    }
  } else {
    if (!property.is_string()) {
      return Error(
          absl::StrCat("Cannot access property with non-string: got ", TypeName(property)));
    }
    value = Builtin(object, property.str());
  }
  return value ? *std::move(value) : Value::Undefined();
}

absl::Status Interpreter::EvaluateArguments(const std::vector<NodePtr>& args, Env* env,
                                            std::vector<Value>* positional, OrderedMap* kwargs) {
  for (const NodePtr& arg : args) {
    if (arg->kind == NodeKind::kSpread) {
      SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(arg->a.get(), env));
      if (!v.is_array()) {
        return Error(absl::StrCat("Cannot unpack non-iterable type: ", TypeName(v)));
      }
      positional->insert(positional->end(), v.items().begin(), v.items().end());
    } else if (arg->kind != NodeKind::kKeywordArg && arg->kind != NodeKind::kKeywordSpread) {
      SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(arg.get(), env));
      positional->push_back(std::move(v));
    }
  }
  auto add = [&](const std::string& key, Value value) -> absl::Status {
    if (kwargs->Find(key) != nullptr) {
      return Error(absl::StrCat("Got multiple values for keyword argument '", key, "'"));
    }
    kwargs->Set(key, std::move(value));
    return absl::OkStatus();
  };
  for (const NodePtr& arg : args) {
    if (arg->kind == NodeKind::kKeywordArg) {
      SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(arg->a.get(), env));
      SPLITMOE_RETURN_IF_ERROR(add(arg->name, std::move(v)));
    } else if (arg->kind == NodeKind::kKeywordSpread) {
      SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(arg->a.get(), env));
      if (!v.is_object()) {
        return Error(absl::StrCat("Argument after ** must be a mapping, not ", TypeName(v)));
      }
      for (const auto& [k, value] : v.map().entries()) SPLITMOE_RETURN_IF_ERROR(add(k, value));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Value>> Interpreter::EvaluateCallArguments(
    const std::vector<NodePtr>& args, Env* env) {
  for (const NodePtr& arg : args) {
    if (arg->kind == NodeKind::kKeywordArg || arg->kind == NodeKind::kSpread ||
        arg->kind == NodeKind::kKeywordSpread) {
      std::vector<Value> positional;
      OrderedMap kwargs;
      SPLITMOE_RETURN_IF_ERROR(EvaluateArguments(args, env, &positional, &kwargs));
      if (!kwargs.empty())
        positional.push_back(Value::Object(std::move(kwargs), ObjectKind::kKwargs));
      return positional;
    }
  }
  std::vector<Value> positional;
  positional.reserve(args.size());
  for (const NodePtr& arg : args) {
    SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(arg.get(), env));
    positional.push_back(std::move(v));
  }
  return positional;
}

absl::StatusOr<Value> Interpreter::EvaluateCall(const Node& n, Env* env) {
  SPLITMOE_ASSIGN_OR_RETURN(std::vector<Value> args, EvaluateCallArguments(n.list, env));
  const Node& callee = *n.a;
  Value fn;
  Value object;
  bool have_object = false;
  if (callee.kind == NodeKind::kMember) {
    // Evaluated here (not through Evaluate) to name the object's type when the method is missing.
    DepthGuard guard(this);
    SPLITMOE_RETURN_IF_ERROR(CheckNesting(callee));
    SPLITMOE_RETURN_IF_ERROR(Step());
    absl::StatusOr<Value> v = EvaluateMember(callee, env, &object);
    if (!v.ok()) return Positioned(v.status(), callee);
    fn = *std::move(v);
    have_object = true;
  } else {
    SPLITMOE_ASSIGN_OR_RETURN(fn, Evaluate(&callee, env));
  }
  if (!fn.is_function()) {
    if (have_object && fn.is_undefined() && !callee.flag) {
      return Unsupported(
          absl::StrCat("method or function: '", callee.b->name, "' of ", TypeName(object)));
    }
    if (callee.kind == NodeKind::kIdentifier && fn.is_undefined()) {
      return Unsupported(absl::StrCat("function: '", callee.name, "' is not defined"));
    }
    return Error(absl::StrCat("Cannot call something that is not a function: got ", TypeName(fn)));
  }
  return fn.function().call(args, env);
}

absl::StatusOr<Value> Interpreter::EvaluateTest(const Node& n, Env* env) {
  SPLITMOE_ASSIGN_OR_RETURN(Value operand, Evaluate(n.a.get(), env));
  absl::StatusOr<bool> r = RunTest(n.name, operand, nullptr);
  if (absl::IsNotFound(r.status())) return Unsupported(absl::StrCat("test: ", n.name));
  if (!r.ok()) return r.status();
  return Value::Bool(n.flag ? !*r : *r);
}

absl::StatusOr<Value> Interpreter::EvaluateUnary(const Node& n, Env* env) {
  SPLITMOE_ASSIGN_OR_RETURN(Value arg, Evaluate(n.a.get(), env));
  if (n.name == "not") return Value::Bool(!Truthy(arg));
  if (arg.is_number() || arg.is_bool()) {
    const double sign = n.name == "-" ? -1 : 1;
    const double result = sign * NumericValue(arg);
    return arg.is_float() ? Value::Float(result) : Value::Int(result);
  }
  return Error(absl::StrCat("Unknown operator \"", n.name, "\" for ", TypeName(arg)));
}

absl::Status Interpreter::BindMacroArguments(const std::string& display,
                                             const std::vector<NodePtr>& params,
                                             const SpecialArgs& special, std::vector<Value> args,
                                             Env* scope) {
  OrderedMap kwargs;
  if (!args.empty() && args.back().is_kwargs()) {
    kwargs = args.back().map();
    args.pop_back();
  }
  std::vector<const Node*> pending;
  for (size_t i = 0; i < params.size(); ++i) {
    const Node& p = *params[i];
    std::optional<Value> value;
    if (i < args.size()) value = args[i];
    if (!value) {
      if (const Value* kw = kwargs.Find(p.name)) {
        value = *kw;
        kwargs.Erase(p.name);
      }
    }
    if (!value && p.kind == NodeKind::kKeywordArg) pending.push_back(&p);
    scope->vars[p.name] = value ? *std::move(value) : Value::Undefined();
  }
  if (special.kwargs) {
    scope->vars["kwargs"] = Value::Object(kwargs);
  } else if (!kwargs.empty()) {
    return Error(absl::StrCat("macro ", display, " takes no keyword argument '",
                              kwargs.entries()[0].first, "'"));
  }
  if (special.varargs) {
    std::vector<Value> rest;
    if (args.size() > params.size())
      rest.assign(args.begin() + static_cast<ptrdiff_t>(params.size()), args.end());
    scope->vars["varargs"] = Value::Array(std::move(rest));
  } else if (args.size() > params.size()) {
    return Error(
        absl::StrCat("macro ", display, " takes not more than ", params.size(), " argument(s)"));
  }
  for (const Node* p : pending) {
    SPLITMOE_ASSIGN_OR_RETURN(Value v, Evaluate(p->a.get(), scope));
    scope->vars[p->name] = std::move(v);
  }
  return absl::OkStatus();
}

absl::StatusOr<Value> Interpreter::DefineMacro(const Node& n, Env* env) {
  const SpecialArgs special = SpecialArgsFinder().Find(n.list, n.list2);
  const Node* node = &n;
  env->vars[n.name] = Value::Function(
      absl::StrCat("macro '", n.name, "'"),
      [this, node, env, special](std::vector<Value>& args, Env* site) -> absl::StatusOr<Value> {
        Env* parent = env;
        if (special.caller) {
          Value caller;
          if (site != nullptr && site->call_block_scope) {
            auto it = site->vars.find("caller");
            if (it != site->vars.end()) caller = it->second;
          }
          SPLITMOE_ASSIGN_OR_RETURN(parent, NewEnv(env));
          parent->vars["caller"] = std::move(caller);
        }
        SPLITMOE_ASSIGN_OR_RETURN(Env * scope, NewEnv(parent));
        SPLITMOE_RETURN_IF_ERROR(BindMacroArguments(absl::StrCat("'", node->name, "'"), node->list,
                                                    special, args, scope));
        SPLITMOE_ASSIGN_OR_RETURN(std::string body, RenderBlock(node->list2, scope));
        return Value::String(std::move(body));
      });
  return Value::Null();
}

absl::StatusOr<Value> Interpreter::EvaluateCallStatement(const Node& n, Env* env) {
  const SpecialArgs special = SpecialArgsFinder().Find(n.list, n.list2);
  const Node* node = &n;
  Value caller = Value::Function(
      "caller",
      [this, node, env, special](std::vector<Value>& args, Env*) -> absl::StatusOr<Value> {
        SPLITMOE_ASSIGN_OR_RETURN(Env * scope, NewEnv(env));
        SPLITMOE_RETURN_IF_ERROR(BindMacroArguments("None", node->list, special, args, scope));
        SPLITMOE_ASSIGN_OR_RETURN(std::string body, RenderBlock(node->list2, scope));
        return Value::String(std::move(body));
      });
  const Node& call = *n.a;
  std::vector<Value> args;
  OrderedMap kwargs;
  SPLITMOE_RETURN_IF_ERROR(EvaluateArguments(call.list, env, &args, &kwargs));
  args.push_back(Value::Object(std::move(kwargs), ObjectKind::kKwargs));
  SPLITMOE_ASSIGN_OR_RETURN(Value fn, Evaluate(call.a.get(), env));
  if (!fn.is_function()) {
    return Error(absl::StrCat("Cannot call something that is not a function: got ", TypeName(fn)));
  }
  Env site;  // read by the macro during the call only
  site.parent = env;
  site.call_block_scope = true;
  site.vars["caller"] = std::move(caller);
  return fn.function().call(args, &site);
}

absl::StatusOr<Value> Interpreter::ApplyFilter(const Value& operand, const Node& filter, Env* env) {
  if (filter.kind == NodeKind::kIdentifier) return ApplyPlainFilter(operand, filter.name, env);
  if (filter.kind == NodeKind::kCall) return ApplyCallFilter(operand, filter, env);
  return Unsupported("filter expression (a filter must be a name or a call of one)");
}

absl::StatusOr<Value> Interpreter::ApplyPlainFilter(const Value& operand, const std::string& name,
                                                    Env* env) {
  auto unsupported = [&]() {
    return Unsupported(absl::StrCat("filter: ", name, " on ", TypeName(operand)));
  };
  if (name == "safe") return operand;
  if (name == "tojson") {
    std::string out;
    JsonOptions options;
    options.max_bytes = limits_.max_output_bytes;
    SPLITMOE_RETURN_IF_ERROR(ToJson(operand, options, 0, /*undefined_as_null=*/true, &out));
    return MakeString(std::move(out));
  }
  if (operand.is_array()) {
    const std::vector<Value>& items = operand.items();
    if (name == "list") return operand;
    if (name == "first" || name == "last") {
      if (items.empty()) {
        return Unsupported(absl::StrCat("filter: ", name,
                                        " of an empty list (the reference returns a raw JavaScript "
                                        "undefined that most uses then reject)"));
      }
      return name == "first" ? items.front() : items.back();
    }
    if (name == "length") return Value::Int(static_cast<double>(items.size()));
    if (name == "reverse") return Value::Array(std::vector<Value>(items.rbegin(), items.rend()));
    if (name == "sort") {
      SPLITMOE_ASSIGN_OR_RETURN(std::vector<Value> sorted, SortByKeys(items, items, false, false));
      return Value::Array(std::move(sorted));
    }
    if (name == "join") {
      std::string out;
      for (const Value& x : items) {
        SPLITMOE_ASSIGN_OR_RETURN(std::string s, JsJoinElement(x, limits_.max_output_bytes));
        out += s;
        SPLITMOE_RETURN_IF_ERROR(CheckSize(out.size()));
      }
      return MakeString(std::move(out));
    }
    if (name == "string") {
      std::string out;
      JsonOptions options;
      options.max_bytes = limits_.max_output_bytes;
      SPLITMOE_RETURN_IF_ERROR(ToJson(operand, options, 0, /*undefined_as_null=*/false, &out));
      return MakeString(std::move(out));
    }
    if (name == "unique") {
      // A JavaScript Set of the raw values: SameValueZero.
      absl::flat_hash_set<std::string> seen;
      std::vector<Value> out;
      for (const Value& x : items) {
        if (seen.insert(SameValueZeroKey(x)).second) out.push_back(x);
      }
      return Value::Array(std::move(out));
    }
    return unsupported();
  }
  if (operand.is_string()) {
    const std::string& s = operand.str();
    if (name == "length" || name == "upper" || name == "lower" || name == "title" ||
        name == "capitalize") {
      std::optional<Value> builtin = StringBuiltin(operand, name);
      if (builtin->is_int()) return *builtin;
      std::vector<Value> no_args;
      return builtin->function().call(no_args, env);
    }
    if (name == "trim") return Value::String(std::string(JsTrim(s)));
    if (name == "indent") {
      std::string out;
      size_t begin = 0;
      bool first_line = true;
      while (true) {
        const size_t nl = s.find('\n', begin);
        const absl::string_view line(s.data() + begin,
                                     (nl == std::string::npos ? s.size() : nl) - begin);
        if (!first_line) out.push_back('\n');
        if (!first_line && !line.empty()) out += "    ";
        out.append(line.data(), line.size());
        first_line = false;
        if (nl == std::string::npos) break;
        begin = nl + 1;
      }
      return MakeString(std::move(out));
    }
    if (name == "join" || name == "string") return operand;
    if (name == "int") {
      const double v = JsParseInt(s);
      return Value::Int(std::isnan(v) ? 0 : v);
    }
    if (name == "float") {
      const double v = JsParseFloat(s);
      return Value::Float(std::isnan(v) ? 0 : v);
    }
    return unsupported();
  }
  if (operand.is_number()) {
    if (name == "abs") {
      return operand.is_int() ? Value::Int(std::fabs(operand.number()))
                              : Value::Float(std::fabs(operand.number()));
    }
    if (name == "int") return Value::Int(std::trunc(operand.number()) + 0.0);
    if (name == "float") return Value::Float(operand.number());
    if (name == "string") {
      SPLITMOE_ASSIGN_OR_RETURN(std::string s, RuntimeToString(operand));
      return Value::String(std::move(s));
    }
    return unsupported();
  }
  if (operand.is_object()) {
    if (name == "items") {
      std::vector<Value> out;
      for (const auto& [k, v] : operand.map().entries()) {
        out.push_back(Value::Array({Value::String(k), v}));
      }
      return Value::Array(std::move(out));
    }
    if (name == "length") return Value::Int(static_cast<double>(operand.map().size()));
    std::optional<Value> builtin = ObjectBuiltin(operand, name);
    if (builtin) {
      if (!builtin->is_function()) return *builtin;
      std::vector<Value> no_args;
      return builtin->function().call(no_args, env);
    }
    return unsupported();
  }
  if (operand.is_bool()) {
    const bool b = operand.boolean();
    if (name == "bool") return operand;
    if (name == "int") return Value::Int(b ? 1 : 0);
    if (name == "float") return Value::Float(b ? 1 : 0);
    if (name == "string") return Value::String(b ? "true" : "false");
    return unsupported();
  }
  return Error(absl::StrCat("Cannot apply filter \"", name, "\" to type: ", TypeName(operand)));
}

absl::StatusOr<Value> Interpreter::ApplyCallFilter(const Value& operand, const Node& filter,
                                                   Env* env) {
  const Node& callee = *filter.a;
  if (callee.kind != NodeKind::kIdentifier) {
    return Unsupported("filter expression (a filter must be a name or a call of one)");
  }
  const std::string& name = callee.name;
  const std::vector<NodePtr>& arg_nodes = filter.list;
  auto unsupported = [&]() {
    return Unsupported(absl::StrCat("filter: ", name, "(...) on ", TypeName(operand)));
  };
  auto evaluate_args = [&](std::vector<Value>* args, OrderedMap* kwargs) {
    return EvaluateArguments(arg_nodes, env, args, kwargs);
  };

  if (name == "tojson") {
    std::vector<Value> args;
    OrderedMap kwargs;
    SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
    JsonOptions options;
    options.max_bytes = limits_.max_output_bytes;
    const Value* indent = kwargs.Find("indent");
    if (indent != nullptr && !indent->is_null()) {
      if (!indent->is_int()) return Error("If set, indent must be a number");
      if (indent->number() < 0) return Error("tojson: indent must not be negative");
      if (indent->number() > 1024) return Unsupported("tojson indent above 1024");
      options.indent = static_cast<int>(indent->number());
    }
    if (const Value* a = kwargs.Find("ensure_ascii")) {
      if (!a->is_bool()) return Error("If set, ensure_ascii must be a boolean");
      options.ensure_ascii = a->boolean();
    }
    if (const Value* k = kwargs.Find("sort_keys")) {
      if (!k->is_bool()) return Error("If set, sort_keys must be a boolean");
      options.sort_keys = k->boolean();
    }
    if (const Value* sep = kwargs.Find("separators"); sep != nullptr && !sep->is_null()) {
      if (!sep->is_array() || sep->items().size() != 2 || !sep->items()[0].is_string() ||
          !sep->items()[1].is_string()) {
        return Error("separators must be a tuple of two strings");
      }
      options.separators = std::make_pair(sep->items()[0].str(), sep->items()[1].str());
    }
    std::string out;
    SPLITMOE_RETURN_IF_ERROR(ToJson(operand, options, 0, /*undefined_as_null=*/true, &out));
    return MakeString(std::move(out));
  }
  if (name == "join") {
    std::vector<std::string> parts;
    if (operand.is_string()) {
      parts = CodePoints(operand.str());
    } else if (operand.is_array()) {
      for (const Value& x : operand.items()) {
        SPLITMOE_ASSIGN_OR_RETURN(std::string s, JsJoinElement(x, limits_.max_output_bytes));
        SPLITMOE_RETURN_IF_ERROR(Charge(s.size()));
        parts.push_back(std::move(s));
      }
    } else {
      return Error(absl::StrCat("Cannot apply filter \"join\" to type: ", TypeName(operand)));
    }
    std::vector<Value> args;
    OrderedMap kwargs;
    SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
    const Value* sep = ArgOrKwarg(args, 0, kwargs, "separator");
    if (sep != nullptr && !sep->is_string()) return Error("separator must be a string");
    const std::string separator = sep != nullptr ? sep->str() : std::string();
    size_t total = 0;
    for (const std::string& p : parts) total += p.size() + separator.size();
    SPLITMOE_RETURN_IF_ERROR(Charge(total));
    return MakeString(absl::StrJoin(parts, separator));
  }
  if (name == "int" || name == "float") {
    const bool is_int = name == "int";
    std::vector<Value> args;
    OrderedMap kwargs;
    SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
    const Value* d = ArgOrKwarg(args, 0, kwargs, "default");
    const Value fallback = d != nullptr ? *d : (is_int ? Value::Int(0) : Value::Float(0));
    if (operand.is_string()) {
      const double v = is_int ? JsParseInt(operand.str()) : JsParseFloat(operand.str());
      if (std::isnan(v)) return fallback;
      return is_int ? Value::Int(v) : Value::Float(v);
    }
    if (operand.is_number()) {
      return is_int ? Value::Int(std::trunc(operand.number()) + 0.0)
                    : Value::Float(operand.number());
    }
    if (operand.is_bool()) {
      const double v = operand.boolean() ? 1 : 0;
      return is_int ? Value::Int(v) : Value::Float(v);
    }
    return Error(absl::StrCat("Cannot apply filter \"", name, "\" to type: ", TypeName(operand)));
  }
  if (name == "default") {
    std::vector<Value> args;
    OrderedMap kwargs;
    SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
    const Value fallback = !args.empty() ? args[0] : Value::String("");
    const Value* b = ArgOrKwarg(args, 1, kwargs, "boolean");
    const Value boolean = b != nullptr ? *b : Value::Bool(false);
    if (!boolean.is_bool()) return Error("`default` filter flag must be a boolean");
    if (operand.is_undefined() || (boolean.boolean() && !Truthy(operand))) return fallback;
    return operand;
  }

  if (operand.is_array()) {
    const std::vector<Value>& items = operand.items();
    if (name == "sort") {
      std::vector<Value> args;
      OrderedMap kwargs;
      SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
      const Value* r = ArgOrKwarg(args, 0, kwargs, "reverse");
      const Value reverse = r != nullptr ? *r : Value::Bool(false);
      if (!reverse.is_bool()) return Error("reverse must be a boolean");
      const Value* c = ArgOrKwarg(args, 1, kwargs, "case_sensitive");
      const Value case_sensitive = c != nullptr ? *c : Value::Bool(false);
      if (!case_sensitive.is_bool()) return Error("case_sensitive must be a boolean");
      const Value* a = ArgOrKwarg(args, 2, kwargs, "attribute");
      const Value attribute = a != nullptr ? *a : Value::Null();
      if (!attribute.is_string() && !attribute.is_int() && !attribute.is_null()) {
        return Error("attribute must be a string, integer, or null");
      }
      std::vector<Value> keys;
      for (const Value& item : items) {
        if (attribute.is_null()) {
          keys.push_back(item);
        } else {
          keys.push_back(GetAttributeValue(
              item, attribute.is_int() ? JsNumberToString(attribute.number()) : attribute.str()));
        }
      }
      SPLITMOE_ASSIGN_OR_RETURN(
          std::vector<Value> sorted,
          SortByKeys(items, keys, case_sensitive.boolean(), reverse.boolean()));
      return Value::Array(std::move(sorted));
    }
    if (name == "selectattr" || name == "rejectattr") {
      const bool select = name == "selectattr";
      for (const Value& item : items) {
        if (!item.is_attribute_container()) {
          return Error(absl::StrCat("`", name, "` can only be applied to array of objects"));
        }
      }
      for (const NodePtr& a : arg_nodes) {
        if (a->kind != NodeKind::kString) {
          return Unsupported(absl::StrCat("arguments of `", name,
                                          "` other than string literals (the reference accepts "
                                          "only those)"));
        }
      }
      if (arg_nodes.size() > 1 && !IsKnownTest(arg_nodes[1]->name)) {
        return Unsupported(absl::StrCat("test: ", arg_nodes[1]->name));
      }
      if (items.empty()) return Value::Array({});
      if (arg_nodes.empty()) return Error(absl::StrCat("`", name, "` needs an attribute name"));
      const std::string& attr = arg_nodes[0]->name;
      std::optional<Value> compare;
      if (arg_nodes.size() > 2) compare = Value::String(arg_nodes[2]->name);
      std::vector<Value> out;
      for (const Value& item : items) {
        SPLITMOE_RETURN_IF_ERROR(Step());
        const Value* a = item.map().Find(attr);
        bool result = false;
        if (a != nullptr) {
          if (arg_nodes.size() > 1) {
            absl::StatusOr<bool> r = RunTest(arg_nodes[1]->name, *a, compare ? &*compare : nullptr);
            if (absl::IsNotFound(r.status())) {
              return Unsupported(absl::StrCat("test: ", arg_nodes[1]->name));
            }
            if (!r.ok()) return r.status();
            result = *r;
          } else {
            result = Truthy(*a);
          }
        }
        if (result == select) out.push_back(item);
      }
      return Value::Array(std::move(out));
    }
    if (name == "map") {
      std::vector<Value> args;
      OrderedMap kwargs;
      SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
      const Value* attr = kwargs.Find("attribute");
      if (attr == nullptr) {
        return Unsupported("filter: map without attribute= (the reference supports only that)");
      }
      if (!attr->is_string()) return Error("attribute must be a string");
      const Value* fallback = kwargs.Find("default");
      std::vector<Value> out;
      for (const Value& item : items) {
        if (!item.is_attribute_container()) return Error("items in map must be an object");
        Value v = GetAttributeValue(item, attr->str());
        if (v.is_undefined() && fallback != nullptr) v = *fallback;
        out.push_back(std::move(v));
      }
      return Value::Array(std::move(out));
    }
    return unsupported();
  }
  if (operand.is_string()) {
    const std::string& s = operand.str();
    if (name == "indent") {
      std::vector<Value> args;
      OrderedMap kwargs;
      SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
      const Value* w = ArgOrKwarg(args, 0, kwargs, "width");
      const Value width = w != nullptr ? *w : Value::Int(4);
      if (!width.is_int() && !width.is_string()) {
        return Error("width must be an integer or a string");
      }
      const Value* f = ArgOrKwarg(args, 1, kwargs, "first");
      const Value* b = ArgOrKwarg(args, 2, kwargs, "blank");
      const bool first = f != nullptr && RawTruthy(*f);
      const bool blank = b != nullptr && RawTruthy(*b);
      std::string indent;
      if (width.is_string()) {
        indent = width.str();
      } else {
        const double n = std::max(0.0, width.number());
        if (n > 1024) return Unsupported("indent width above 1024");
        indent.assign(static_cast<size_t>(n), ' ');
      }
      std::string out;
      size_t begin = 0;
      bool first_line = true;
      while (true) {
        const size_t nl = s.find('\n', begin);
        const absl::string_view line(s.data() + begin,
                                     (nl == std::string::npos ? s.size() : nl) - begin);
        if (!first_line) out.push_back('\n');
        if (!((!first && first_line) || (!blank && line.empty()))) out += indent;
        out.append(line.data(), line.size());
        first_line = false;
        if (out.size() > limits_.max_output_bytes) break;
        if (nl == std::string::npos) break;
        begin = nl + 1;
      }
      return MakeString(std::move(out));
    }
    if (name == "replace") {
      std::vector<Value> args;
      OrderedMap kwargs;
      SPLITMOE_RETURN_IF_ERROR(evaluate_args(&args, &kwargs));
      args.push_back(Value::Object(std::move(kwargs), ObjectKind::kKwargs));
      std::optional<Value> fn = StringBuiltin(operand, "replace");
      return fn->function().call(args, env);
    }
    return unsupported();
  }
  if (operand.is_object()) {
    std::optional<Value> builtin = ObjectBuiltin(operand, name);
    if (builtin && builtin->is_function()) {
      SPLITMOE_ASSIGN_OR_RETURN(std::vector<Value> args, EvaluateCallArguments(arg_nodes, env));
      return builtin->function().call(args, env);
    }
    return unsupported();
  }
  return Error(absl::StrCat("Cannot apply filter \"", name, "\" to type: ", TypeName(operand)));
}

}  // namespace

absl::StatusOr<std::string> RenderProgram(const Node& program, const Value& context,
                                          const JinjaLimits& limits) {
  Interpreter interpreter(limits);
  return interpreter.Run(program, context);
}

}  // namespace splitmoe::chat::internal
