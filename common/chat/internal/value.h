// Runtime values of the Jinja renderer (jinja.h), modelled on @huggingface/jinja's runtime
// values: undefined, none, booleans, numbers (an integer or a float, both IEEE doubles as in
// JavaScript), strings (UTF-8), arrays (also tuples), objects (insertion-ordered; also keyword
// arguments and `loop`), namespaces and functions. Arrays, objects, namespaces and functions are
// shared by reference, as JavaScript objects are: `==` compares them by identity, and a namespace
// assigned through one reference is seen through all. A Value lives only inside one render; it is
// not thread-safe.
//
// Also here: the JavaScript conversions the renderer must reproduce byte for byte: Number's
// toString, String(x), JSON.stringify, loose (==) and strict (===) equality, parseInt/parseFloat.
//
//   Value v = Value::String("a");  Truthy(v) == true;  JsNumberToString(1e21) == "1e+21"
#ifndef SPLITMOE_COMMON_CHAT_INTERNAL_VALUE_H_
#define SPLITMOE_COMMON_CHAT_INTERNAL_VALUE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace splitmoe::chat::internal {

class Value;
class OrderedMap;
struct ArrayData;
struct ObjectData;
struct FunctionData;
struct Env;

// Objects are plain (from JSON or literals), keyword arguments of a call, or a for loop's `loop`.
enum class ObjectKind { kPlain, kKwargs, kLoop };

// Calls receive the positional arguments, followed by one keyword-arguments object when there
// are keyword arguments, and the environment of the call site.
using NativeFunction = std::function<absl::StatusOr<Value>(std::vector<Value>& args, Env* site)>;

class Value {
 public:
  enum class Type : uint8_t {
    kUndefined,
    kNull,
    kBool,
    kInt,
    kFloat,
    kString,
    kArray,
    kObject,
    kNamespace,
    kFunction,
  };

  Value() = default;  // undefined
  static Value Undefined() { return Value(); }
  static Value Null() { return Value(Type::kNull); }
  static Value Bool(bool b);
  static Value Int(double v);
  static Value Float(double v);
  static Value String(std::string s);
  static Value Array(std::vector<Value> items, bool is_tuple = false);
  static Value Object(OrderedMap map, ObjectKind kind = ObjectKind::kPlain);
  static Value Namespace(OrderedMap map);
  // `holds` is the value a method is bound to (its depth counts), if any.
  static Value Function(std::string name, NativeFunction fn, const Value* holds = nullptr);

  Type type() const { return type_; }
  bool is_undefined() const { return type_ == Type::kUndefined; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_int() const { return type_ == Type::kInt; }
  bool is_float() const { return type_ == Type::kFloat; }
  bool is_number() const { return type_ == Type::kInt || type_ == Type::kFloat; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }  // arrays and tuples
  bool is_tuple() const;
  bool is_object() const { return type_ == Type::kObject; }  // plain, kwargs and loop
  bool is_kwargs() const;
  bool is_namespace() const { return type_ == Type::kNamespace; }
  bool is_function() const { return type_ == Type::kFunction; }
  // ObjectValue or NamespaceValue: what attribute lookups and selectattr accept.
  bool is_attribute_container() const { return is_object() || is_namespace(); }

  bool boolean() const { return bool_; }
  double number() const { return number_; }
  const std::string& str() const { return *string_; }
  const std::vector<Value>& items() const;
  const OrderedMap& map() const;  // objects and namespaces
  OrderedMap& mutable_map() const;
  const FunctionData& function() const;
  // Identity of a reference value (array, object, namespace, function); null for the others.
  const void* identity() const;
  // Nesting of reference values: 0 for a scalar, 1 + the deepest element otherwise. A namespace
  // remembers the deepest value ever assigned into it (NoteAssigned).
  int depth() const;
  // Records that a value of depth `child_depth` was stored into this namespace.
  void NoteAssigned(int child_depth) const;

 private:
  explicit Value(Type t) : type_(t) {}
  Type type_ = Type::kUndefined;
  bool bool_ = false;
  double number_ = 0;
  std::shared_ptr<const std::string> string_;
  std::shared_ptr<ArrayData> array_;
  std::shared_ptr<ObjectData> object_;  // objects and namespaces
  std::shared_ptr<FunctionData> function_;
};

// An insertion-ordered string -> Value map with JavaScript Map semantics: setting an existing key
// keeps its position.
class OrderedMap {
 public:
  const Value* Find(absl::string_view key) const;
  Value* Find(absl::string_view key);
  void Set(std::string key, Value value);
  bool Erase(absl::string_view key);
  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const std::vector<std::pair<std::string, Value>>& entries() const { return entries_; }

 private:
  void Reindex();
  std::vector<std::pair<std::string, Value>> entries_;
  // Built once the map grows past a few entries; maps a key to its index in entries_.
  absl::flat_hash_map<std::string, size_t> index_;
};

struct ArrayData {
  std::vector<Value> items;
  int depth = 1;
  bool is_tuple = false;  // @huggingface/jinja's TupleValue: an array that is not "ArrayValue"
};

struct ObjectData {
  ObjectKind kind = ObjectKind::kPlain;
  OrderedMap map;
  int depth = 1;
};

struct FunctionData {
  std::string name;  // for messages: "macro 'foo'", "range", "method 'split'"
  NativeFunction call;
  int depth = 1;
};

inline bool Value::is_tuple() const { return is_array() && array_->is_tuple; }
inline bool Value::is_kwargs() const { return is_object() && object_->kind == ObjectKind::kKwargs; }
inline const std::vector<Value>& Value::items() const { return array_->items; }
inline const OrderedMap& Value::map() const { return object_->map; }
inline OrderedMap& Value::mutable_map() const { return object_->map; }
inline const FunctionData& Value::function() const { return *function_; }

// @huggingface/jinja's type name of `v` ("StringValue", "TupleValue", ...), for messages.
const char* TypeName(const Value& v);

// Python-style truthiness as @huggingface/jinja computes it (__bool__): empty arrays and objects
// are false, a namespace is always true.
bool Truthy(const Value& v);

// JavaScript's Number.prototype.toString() (shortest round trip; "1e+21", "1e-7", "NaN").
std::string JsNumberToString(double v);

// What `{{ v }}` prints for a float: "1.0", "-0.0", "2.5", "1e+21".
std::string FloatToString(double v);

// RuntimeValue.toString(): what `{{ v }}` prints (the caller skips null and undefined, which
// print "undefined" inside arrays' raw string forms: the reference's NullValue holds no value);
// arrays, objects and namespaces print as JSON. Fails for tuples, keyword arguments and functions
// (as the reference does, or where it would print JavaScript source).
absl::StatusOr<std::string> RuntimeToString(const Value& v, size_t max_bytes = SIZE_MAX);

// `v.value.toString()`: the string `+` and `~` concatenate. Numbers print without a forced
// ".0", arrays join their elements' RuntimeToString with ",", objects and namespaces print
// "[object Map]". Fails for null, undefined and functions.
absl::StatusOr<std::string> JsRawToString(const Value& v, size_t max_bytes = SIZE_MAX);

// The elements Array.prototype.join sees in the `join` filter: null and undefined join as "".
absl::StatusOr<std::string> JsJoinElement(const Value& v, size_t max_bytes = SIZE_MAX);

struct JsonOptions {
  int indent = 0;  // 0: one line
  bool ensure_ascii = false;
  bool sort_keys = false;
  std::optional<std::pair<std::string, std::string>> separators;  // item, key
  size_t max_bytes = SIZE_MAX;  // fails with ResourceExhausted past this much output
};

// @huggingface/jinja's toJSON (the `tojson` filter, and how arrays and objects print).
// `undefined_as_null` selects between "null" and "undefined" for undefined values.
absl::Status ToJson(const Value& v, const JsonOptions& options, int depth, bool undefined_as_null,
                    std::string* out);

// JavaScript's == on the values' raw forms (1 == "1", references by identity). The raw form of
// none is undefined, as in the reference. Fails where converting a list to a primitive fails
// (a tuple inside it).
absl::StatusOr<bool> LooseEquals(const Value& a, const Value& b);
// JavaScript's === on the raw forms (1 === 1.0, none === undefined, references by identity).
bool StrictEquals(const Value& a, const Value& b);
// SameValueZero (Set membership): === except that NaN equals NaN.
bool SameValueZero(const Value& a, const Value& b);

// parseInt(s, 10) and parseFloat(s): NaN when no number starts `s`.
double JsParseInt(absl::string_view s);
double JsParseFloat(absl::string_view s);

// A JSON value as @huggingface/jinja sees it after JSON.parse: integral numbers are integers,
// object keys that are array indices ("0", "17") come first in ascending order, then the others
// in the given order. Strings must be valid UTF-8.
absl::StatusOr<Value> FromJson(const nlohmann::json& j);
absl::StatusOr<Value> FromJson(const nlohmann::ordered_json& j);

}  // namespace splitmoe::chat::internal

#endif  // SPLITMOE_COMMON_CHAT_INTERNAL_VALUE_H_
