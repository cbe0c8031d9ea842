// The syntax tree of a parsed Jinja template (jinja.h), one node type per @huggingface/jinja AST
// class. A Node is immutable once parsed and shared by every render of its template (any
// thread). Fields by kind (unused ones stay empty):
//
//   kProgram          list: statements
//   kText             name: the text (a StringLiteral in statement position)
//   kComment          -
//   kIf               a: test, list: body, list2: alternate (an elif is one nested kIf)
//   kFor              a: loop variable (kIdentifier or kTuple), b: iterable (may be kSelect),
//                     list: body, list2: else block
//   kBreak, kContinue -
//   kSet              a: assignee, b: value (null for a block set), list: block body
//   kMacro            name: macro name, list: parameters (kIdentifier / kKeywordArg), list2: body
//   kCallStatement    a: the call (kCall), flag: has caller parameters, list: caller parameters,
//                     list2: body
//   kFilterStatement  a: filter (kIdentifier or kCall), list: body
//   kIdentifier       name
//   kInt, kFloat      number
//   kString           name: the value
//   kArray, kTuple    list: elements
//   kObject           list: keys, list2: values
//   kMember           a: object, b: property, flag: computed (a[b] rather than a.b)
//   kCall             a: callee, list: arguments
//   kBinary           name: operator ("+", "and", "not in", ...), a: left, b: right
//   kFilter           a: operand, b: filter (kIdentifier or kCall)
//   kTest             a: operand, name: test, flag: negated (`is not`)
//   kUnary            name: operator ("not", "-", "+"), a: operand
//   kSlice            a: start, b: stop, c: step (each may be null)
//   kKeywordArg       name: key, a: value
//   kSpread           a: the unpacked sequence (*x)
//   kKeywordSpread    a: the unpacked mapping (**x)
//   kTernary          a: condition, b: value if true, c: value if false
//   kSelect           a: value, b: condition (`x if c` without else)
#ifndef SPLITMOE_COMMON_CHAT_INTERNAL_AST_H_
#define SPLITMOE_COMMON_CHAT_INTERNAL_AST_H_

#include <memory>
#include <string>
#include <vector>

namespace splitmoe::chat::internal {

enum class NodeKind {
  kProgram,
  kText,
  kComment,
  kIf,
  kFor,
  kBreak,
  kContinue,
  kSet,
  kMacro,
  kCallStatement,
  kFilterStatement,
  kIdentifier,
  kInt,
  kFloat,
  kString,
  kArray,
  kTuple,
  kObject,
  kMember,
  kCall,
  kBinary,
  kFilter,
  kTest,
  kUnary,
  kSlice,
  kKeywordArg,
  kSpread,
  kKeywordSpread,
  kTernary,
  kSelect,
};

struct Node {
  Node(NodeKind k, int l, int c) : kind(k), line(l), column(c) {}

  NodeKind kind;
  int line;
  int column;
  int depth = 1;  // height of this subtree (the parser bounds it)
  std::string name;
  double number = 0;
  bool flag = false;
  std::unique_ptr<Node> a, b, c;
  std::vector<std::unique_ptr<Node>> list, list2;
};

}  // namespace splitmoe::chat::internal

#endif  // SPLITMOE_COMMON_CHAT_INTERNAL_AST_H_
