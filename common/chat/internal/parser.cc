#include "common/chat/internal/parser.h"

#include <algorithm>
#include <initializer_list>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/chat/internal/value.h"

namespace splitmoe::chat::internal {
namespace {

using NodePtr = std::unique_ptr<Node>;

enum class ArgsMode { kCall, kParameters };

class Parser {
 public:
  explicit Parser(const std::vector<Token>& tokens) : tokens_(tokens) {}

  absl::StatusOr<NodePtr> Run() {
    NodePtr program = std::make_unique<Node>(NodeKind::kProgram, 1, 1);
    while (current_ < tokens_.size()) {
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr statement, ParseAny());
      program->list.push_back(std::move(statement));
    }
    return Finish(std::move(program));
  }

 private:
  // Bounds the parser's recursion.
  class DepthGuard {
   public:
    explicit DepthGuard(Parser* p) : p_(p) { ++p_->depth_; }
    ~DepthGuard() { --p_->depth_; }
    bool exceeded() const { return p_->depth_ > kMaxParseDepth; }

   private:
    Parser* p_;
  };

  bool AtEnd() const { return current_ >= tokens_.size(); }

  // Position of the current token (or of the last one at the end of the input).
  std::pair<int, int> Where() const {
    if (tokens_.empty()) return {1, 1};
    const Token& t = tokens_[std::min(current_, tokens_.size() - 1)];
    return {t.line, t.column};
  }

  absl::Status ErrorAt(int line, int column, absl::string_view message) const {
    return absl::InvalidArgumentError(
        absl::StrCat("syntax error at line ", line, " col ", column, ": ", message));
  }
  absl::Status Error(absl::string_view message) const {
    const auto [line, column] = Where();
    if (AtEnd()) {
      return ErrorAt(line, column, absl::StrCat(message, " (unexpected end of template)"));
    }
    return ErrorAt(line, column, message);
  }

  NodePtr Make(NodeKind kind) const {
    const auto [line, column] = Where();
    return std::make_unique<Node>(kind, line, column);
  }
  NodePtr MakeAt(NodeKind kind, const Node& at) const {
    return std::make_unique<Node>(kind, at.line, at.column);
  }

  // Computes the height of `node` from its children and bounds it.
  absl::StatusOr<NodePtr> Finish(NodePtr node) const {
    int depth = 0;
    for (const NodePtr* child : {&node->a, &node->b, &node->c}) {
      if (*child) depth = std::max(depth, (*child)->depth);
    }
    for (const auto* list : {&node->list, &node->list2}) {
      for (const NodePtr& child : *list) depth = std::max(depth, child->depth);
    }
    node->depth = depth + 1;
    if (node->depth > kMaxAstDepth) {
      return ErrorAt(
          node->line, node->column,
          absl::StrCat("template nested too deeply (more than ", kMaxAstDepth, " levels)"));
    }
    return node;
  }

  bool Is(std::initializer_list<TokenType> types) const {
    if (current_ + types.size() > tokens_.size()) return false;
    size_t i = current_;
    for (TokenType t : types) {
      if (tokens_[i++].type != t) return false;
    }
    return true;
  }
  bool Is(TokenType t) const { return Is({t}); }

  bool IsStatement(std::initializer_list<absl::string_view> names) const {
    if (current_ + 1 >= tokens_.size()) return false;
    if (tokens_[current_].type != TokenType::kOpenStatement) return false;
    const Token& name = tokens_[current_ + 1];
    if (name.type != TokenType::kIdentifier) return false;
    return std::find(names.begin(), names.end(), name.value) != names.end();
  }

  bool IsIdentifier(std::initializer_list<absl::string_view> names) const {
    if (current_ + names.size() > tokens_.size()) return false;
    size_t i = current_;
    for (absl::string_view n : names) {
      const Token& t = tokens_[i++];
      if (t.type != TokenType::kIdentifier || t.value != n) return false;
    }
    return true;
  }
  bool IsIdentifier(absl::string_view name) const { return IsIdentifier({name}); }

  absl::StatusOr<const Token*> Expect(TokenType type, absl::string_view what) {
    if (AtEnd()) return Error(absl::StrCat("expected ", what));
    const Token& t = tokens_[current_];
    if (t.type != type) {
      return Error(
          absl::StrCat("expected ", what, ", got ", TokenTypeName(t.type), " '", t.value, "'"));
    }
    ++current_;
    return &t;
  }

  absl::Status ExpectIdentifier(absl::string_view name) {
    if (!IsIdentifier(name)) return Error(absl::StrCat("expected '", name, "'"));
    ++current_;
    return absl::OkStatus();
  }

  // Parses statements until the next {% <one of names> %}; fails at the end of the template,
  // naming the block that was left open.
  absl::Status ParseBodyUntil(std::initializer_list<absl::string_view> names,
                              absl::string_view block, int line, int column,
                              std::vector<NodePtr>* body) {
    while (!IsStatement(names)) {
      if (AtEnd()) {
        std::string expected;
        for (absl::string_view n : names) {
          absl::StrAppend(&expected, expected.empty() ? "" : " or ", "{% ", n, " %}");
        }
        return ErrorAt(line, column,
                       absl::StrCat("unclosed '", block, "' block: expected ", expected,
                                    " before the end of the template"));
      }
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr statement, ParseAny());
      body->push_back(std::move(statement));
    }
    return absl::OkStatus();
  }

  // Consumes {% <name> %}.
  absl::Status ExpectEndTag(absl::string_view name) {
    SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kOpenStatement, "'{%'").status());
    SPLITMOE_RETURN_IF_ERROR(ExpectIdentifier(name));
    return Expect(TokenType::kCloseStatement, "'%}'").status();
  }

  absl::StatusOr<NodePtr> ParseAny() {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("template nested too deeply");
    if (AtEnd()) return Error("expected a statement");
    const Token& t = tokens_[current_];
    switch (t.type) {
      case TokenType::kComment: {
        NodePtr n = Make(NodeKind::kComment);
        ++current_;
        return n;
      }
      case TokenType::kText: {
        NodePtr n = Make(NodeKind::kText);
        n->name = t.value;
        ++current_;
        return n;
      }
      case TokenType::kOpenStatement:
        return ParseStatement();
      case TokenType::kOpenExpression: {
        ++current_;
        SPLITMOE_ASSIGN_OR_RETURN(NodePtr e, ParseExpression());
        SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseExpression, "'}}'").status());
        return e;
      }
      default:
        return Error(absl::StrCat("unexpected ", TokenTypeName(t.type), " '", t.value, "'"));
    }
  }

  absl::StatusOr<NodePtr> ParseStatement() {
    const auto [line, column] = Where();
    ++current_;  // {%
    if (AtEnd() || tokens_[current_].type != TokenType::kIdentifier) {
      return Error("expected a statement name after '{%'");
    }
    const std::string name = tokens_[current_].value;
    if (name == "set") {
      ++current_;
      return ParseSet(line, column);
    }
    if (name == "if") {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr n, ParseIf(line, column));
      SPLITMOE_RETURN_IF_ERROR(ExpectEndTag("endif"));
      return n;
    }
    if (name == "macro") {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr n, ParseMacro(line, column));
      SPLITMOE_RETURN_IF_ERROR(ExpectEndTag("endmacro"));
      return n;
    }
    if (name == "for") {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr n, ParseFor(line, column));
      SPLITMOE_RETURN_IF_ERROR(ExpectEndTag("endfor"));
      return n;
    }
    if (name == "call") {
      ++current_;
      NodePtr n = std::make_unique<Node>(NodeKind::kCallStatement, line, column);
      if (Is(TokenType::kOpenParen)) {
        n->flag = true;
        SPLITMOE_ASSIGN_OR_RETURN(n->list, ParseArgs(ArgsMode::kParameters));
      }
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr callee, ParsePrimary());
      if (callee->kind != NodeKind::kIdentifier) {
        return ErrorAt(callee->line, callee->column, "expected an identifier after 'call'");
      }
      NodePtr call = MakeAt(NodeKind::kCall, *callee);
      call->a = std::move(callee);
      SPLITMOE_ASSIGN_OR_RETURN(call->list, ParseArgs(ArgsMode::kCall));
      SPLITMOE_ASSIGN_OR_RETURN(n->a, Finish(std::move(call)));
      SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
      SPLITMOE_RETURN_IF_ERROR(ParseBodyUntil({"endcall"}, "call", line, column, &n->list2));
      SPLITMOE_RETURN_IF_ERROR(ExpectEndTag("endcall"));
      return Finish(std::move(n));
    }
    if (name == "break" || name == "continue") {
      ++current_;
      SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
      return std::make_unique<Node>(name == "break" ? NodeKind::kBreak : NodeKind::kContinue, line,
                                    column);
    }
    if (name == "filter") {
      ++current_;
      NodePtr n = std::make_unique<Node>(NodeKind::kFilterStatement, line, column);
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr filter, ParsePrimary());
      if (filter->kind == NodeKind::kIdentifier && Is(TokenType::kOpenParen)) {
        SPLITMOE_ASSIGN_OR_RETURN(filter, ParseCall(std::move(filter)));
      }
      n->a = std::move(filter);
      SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
      SPLITMOE_RETURN_IF_ERROR(ParseBodyUntil({"endfilter"}, "filter", line, column, &n->list));
      SPLITMOE_RETURN_IF_ERROR(ExpectEndTag("endfilter"));
      return Finish(std::move(n));
    }
    static constexpr absl::string_view kBlockWords[] = {"elif",    "else",      "endif",
                                                        "endfor",  "endset",    "endmacro",
                                                        "endcall", "endfilter", "endgeneration"};
    for (absl::string_view w : kBlockWords) {
      if (name == w) {
        return ErrorAt(line, column,
                       absl::StrCat("unexpected '{% ", name,
                                    " %}' (no open block "
                                    "takes it here)"));
      }
    }
    return absl::UnimplementedError(
        absl::StrCat("unsupported statement: ", name, " at line ", line, " col ", column));
  }

  absl::StatusOr<NodePtr> ParseSet(int line, int column) {
    NodePtr n = std::make_unique<Node>(NodeKind::kSet, line, column);
    SPLITMOE_ASSIGN_OR_RETURN(n->a, ParseExpressionSequence(false));
    if (Is(TokenType::kEquals)) {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(n->b, ParseExpressionSequence(false));
    } else {
      SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}' or '='").status());
      SPLITMOE_RETURN_IF_ERROR(ParseBodyUntil({"endset"}, "set", line, column, &n->list));
      SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kOpenStatement, "'{%'").status());
      SPLITMOE_RETURN_IF_ERROR(ExpectIdentifier("endset"));
    }
    SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseIf(int line, int column) {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("template nested too deeply");
    NodePtr n = std::make_unique<Node>(NodeKind::kIf, line, column);
    SPLITMOE_ASSIGN_OR_RETURN(n->a, ParseExpression());
    SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
    SPLITMOE_RETURN_IF_ERROR(
        ParseBodyUntil({"elif", "else", "endif"}, "if", line, column, &n->list));
    if (IsStatement({"elif"})) {
      const auto [eline, ecolumn] = Where();
      current_ += 2;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr elif, ParseIf(eline, ecolumn));
      n->list2.push_back(std::move(elif));
    } else if (IsStatement({"else"})) {
      current_ += 2;
      SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
      SPLITMOE_RETURN_IF_ERROR(ParseBodyUntil({"endif"}, "if", line, column, &n->list2));
    }
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseMacro(int line, int column) {
    NodePtr n = std::make_unique<Node>(NodeKind::kMacro, line, column);
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr name, ParsePrimary());
    if (name->kind != NodeKind::kIdentifier) {
      return ErrorAt(name->line, name->column, "expected an identifier after 'macro'");
    }
    n->name = name->name;
    SPLITMOE_ASSIGN_OR_RETURN(n->list, ParseArgs(ArgsMode::kParameters));
    SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
    SPLITMOE_RETURN_IF_ERROR(ParseBodyUntil({"endmacro"}, "macro", line, column, &n->list2));
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseExpressionSequence(bool primary) {
    NodePtr first;
    if (primary) {
      SPLITMOE_ASSIGN_OR_RETURN(first, ParsePrimary());
    } else {
      SPLITMOE_ASSIGN_OR_RETURN(first, ParseExpression());
    }
    if (!Is(TokenType::kComma)) return first;
    NodePtr tuple = MakeAt(NodeKind::kTuple, *first);
    tuple->list.push_back(std::move(first));
    while (true) {
      ++current_;  // ,
      NodePtr next;
      if (primary) {
        SPLITMOE_ASSIGN_OR_RETURN(next, ParsePrimary());
      } else {
        SPLITMOE_ASSIGN_OR_RETURN(next, ParseExpression());
      }
      tuple->list.push_back(std::move(next));
      if (!Is(TokenType::kComma)) break;
    }
    return Finish(std::move(tuple));
  }

  absl::StatusOr<NodePtr> ParseFor(int line, int column) {
    NodePtr n = std::make_unique<Node>(NodeKind::kFor, line, column);
    SPLITMOE_ASSIGN_OR_RETURN(n->a, ParseExpressionSequence(true));
    if (n->a->kind != NodeKind::kIdentifier && n->a->kind != NodeKind::kTuple) {
      return ErrorAt(n->a->line, n->a->column, "expected an identifier or tuple as loop variable");
    }
    if (!IsIdentifier("in")) return Error("expected 'in' after the loop variable");
    ++current_;
    SPLITMOE_ASSIGN_OR_RETURN(n->b, ParseExpression());
    SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
    SPLITMOE_RETURN_IF_ERROR(ParseBodyUntil({"endfor", "else"}, "for", line, column, &n->list));
    if (IsStatement({"else"})) {
      current_ += 2;
      SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseStatement, "'%}'").status());
      SPLITMOE_RETURN_IF_ERROR(ParseBodyUntil({"endfor"}, "for", line, column, &n->list2));
    }
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseExpression() {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("expression nested too deeply");
    return ParseIfExpression();
  }

  absl::StatusOr<NodePtr> ParseIfExpression() {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("expression nested too deeply");
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr a, ParseLogicalOr());
    if (!IsIdentifier("if")) return a;
    NodePtr n = Make(NodeKind::kTernary);
    ++current_;
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr test, ParseLogicalOr());
    if (IsIdentifier("else")) {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr otherwise, ParseIfExpression());
      n->a = std::move(test);
      n->b = std::move(a);
      n->c = std::move(otherwise);
    } else {
      n->kind = NodeKind::kSelect;
      n->a = std::move(a);
      n->b = std::move(test);
    }
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> Binary(std::string op, NodePtr left, NodePtr right) {
    NodePtr n = MakeAt(NodeKind::kBinary, *left);
    n->name = std::move(op);
    n->a = std::move(left);
    n->b = std::move(right);
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseLogicalOr() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr left, ParseLogicalAnd());
    while (IsIdentifier("or")) {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr right, ParseLogicalAnd());
      SPLITMOE_ASSIGN_OR_RETURN(left, Binary("or", std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseLogicalAnd() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr left, ParseLogicalNegation());
    while (IsIdentifier("and")) {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr right, ParseLogicalNegation());
      SPLITMOE_ASSIGN_OR_RETURN(left, Binary("and", std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseLogicalNegation() {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("expression nested too deeply");
    NodePtr right;
    // As the reference: `not a not b` parses as `not b`.
    while (IsIdentifier("not")) {
      NodePtr n = Make(NodeKind::kUnary);
      n->name = "not";
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(n->a, ParseLogicalNegation());
      SPLITMOE_ASSIGN_OR_RETURN(right, Finish(std::move(n)));
    }
    if (right) return right;
    return ParseComparison();
  }

  absl::StatusOr<NodePtr> ParseComparison() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr left, ParseAdditive());
    while (true) {
      std::string op;
      if (IsIdentifier({"not", "in"})) {
        op = "not in";
        current_ += 2;
      } else if (IsIdentifier("in")) {
        op = "in";
        ++current_;
      } else if (Is(TokenType::kComparisonBinaryOperator)) {
        op = tokens_[current_++].value;
      } else {
        break;
      }
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr right, ParseAdditive());
      SPLITMOE_ASSIGN_OR_RETURN(left, Binary(std::move(op), std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseAdditive() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr left, ParseMultiplicative());
    while (Is(TokenType::kAdditiveBinaryOperator)) {
      std::string op = tokens_[current_++].value;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr right, ParseMultiplicative());
      SPLITMOE_ASSIGN_OR_RETURN(left, Binary(std::move(op), std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseCallMember() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr primary, ParsePrimary());
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr member, ParseMember(std::move(primary)));
    if (Is(TokenType::kOpenParen)) return ParseCall(std::move(member));
    return member;
  }

  absl::StatusOr<NodePtr> ParseCall(NodePtr callee) {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("expression nested too deeply");
    NodePtr call = MakeAt(NodeKind::kCall, *callee);
    call->a = std::move(callee);
    SPLITMOE_ASSIGN_OR_RETURN(call->list, ParseArgs(ArgsMode::kCall));
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr expression, Finish(std::move(call)));
    SPLITMOE_ASSIGN_OR_RETURN(expression, ParseMember(std::move(expression)));
    if (Is(TokenType::kOpenParen)) return ParseCall(std::move(expression));
    return expression;
  }

  absl::StatusOr<std::vector<NodePtr>> ParseArgs(ArgsMode mode) {
    SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kOpenParen, "'('").status());
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<NodePtr> args, ParseArgumentsList(mode));
    SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseParen, "')'").status());
    return args;
  }

  absl::StatusOr<std::vector<NodePtr>> ParseArgumentsList(ArgsMode mode) {
    std::vector<NodePtr> args;
    std::vector<std::string> parameter_names;
    bool saw_keyword_or_default = false;
    bool saw_spread = false;
    while (!Is(TokenType::kCloseParen)) {
      const bool keyword_spread = Is(TokenType::kExponentiationBinaryOperator);
      const bool positional_spread =
          Is(TokenType::kMultiplicativeBinaryOperator) && tokens_[current_].value == "*";
      if (mode == ArgsMode::kParameters && (keyword_spread || positional_spread)) {
        return Error("argument unpacking is not allowed in parameter declarations");
      }
      if (keyword_spread) {
        NodePtr n = Make(NodeKind::kKeywordSpread);
        ++current_;
        SPLITMOE_ASSIGN_OR_RETURN(n->a, ParseExpression());
        SPLITMOE_ASSIGN_OR_RETURN(n, Finish(std::move(n)));
        args.push_back(std::move(n));
        if (Is(TokenType::kComma)) ++current_;
        if (!Is(TokenType::kCloseParen)) {
          return Error("expected ')': '**' must be applied to the final argument");
        }
        break;
      }
      NodePtr argument;
      if (positional_spread) {
        if (saw_spread) return Error("only one '*' argument unpacking is allowed");
        saw_spread = true;
        argument = Make(NodeKind::kSpread);
        ++current_;
        SPLITMOE_ASSIGN_OR_RETURN(argument->a, ParseExpression());
        SPLITMOE_ASSIGN_OR_RETURN(argument, Finish(std::move(argument)));
      } else {
        SPLITMOE_ASSIGN_OR_RETURN(argument, ParseExpression());
        if (Is(TokenType::kEquals)) {
          ++current_;
          if (argument->kind != NodeKind::kIdentifier) {
            return ErrorAt(argument->line, argument->column,
                           mode == ArgsMode::kParameters
                               ? "expected an identifier for a parameter declaration"
                               : "expected an identifier for a keyword argument");
          }
          NodePtr kw = MakeAt(NodeKind::kKeywordArg, *argument);
          kw->name = argument->name;
          SPLITMOE_ASSIGN_OR_RETURN(kw->a, ParseExpression());
          SPLITMOE_ASSIGN_OR_RETURN(argument, Finish(std::move(kw)));
        }
        if (mode == ArgsMode::kParameters) {
          if (argument->kind != NodeKind::kIdentifier && argument->kind != NodeKind::kKeywordArg) {
            return ErrorAt(argument->line, argument->column,
                           "expected an identifier for a parameter declaration");
          }
          if (std::find(parameter_names.begin(), parameter_names.end(), argument->name) !=
              parameter_names.end()) {
            return ErrorAt(argument->line, argument->column,
                           absl::StrCat("duplicate parameter name: ", argument->name));
          }
          parameter_names.push_back(argument->name);
        }
        if (argument->kind == NodeKind::kKeywordArg) {
          saw_keyword_or_default = true;
        } else if (saw_keyword_or_default) {
          return ErrorAt(argument->line, argument->column,
                         mode == ArgsMode::kCall
                             ? "positional arguments must come before keyword arguments"
                             : "non-default argument follows default argument");
        } else if (saw_spread) {
          return ErrorAt(argument->line, argument->column,
                         "positional arguments must not follow '*' argument unpacking");
        }
      }
      args.push_back(std::move(argument));
      if (Is(TokenType::kComma)) ++current_;
    }
    return args;
  }

  // The inside of [...]: an index, or a slice of up to three parts.
  absl::StatusOr<NodePtr> ParseSubscript() {
    const auto [line, column] = Where();
    std::vector<NodePtr> slices;
    bool is_slice = false;
    while (!Is(TokenType::kCloseSquareBracket)) {
      if (Is(TokenType::kColon)) {
        slices.push_back(nullptr);
        ++current_;
        is_slice = true;
      } else {
        SPLITMOE_ASSIGN_OR_RETURN(NodePtr e, ParseExpression());
        slices.push_back(std::move(e));
        if (Is(TokenType::kColon)) {
          ++current_;
          is_slice = true;
        }
      }
    }
    if (slices.empty()) return ErrorAt(line, column, "expected an index or slice inside '[]'");
    if (!is_slice) return std::move(slices[0]);
    if (slices.size() > 3) return ErrorAt(line, column, "a slice takes at most 3 parts");
    NodePtr n = std::make_unique<Node>(NodeKind::kSlice, line, column);
    n->a = std::move(slices[0]);
    if (slices.size() > 1) n->b = std::move(slices[1]);
    if (slices.size() > 2) n->c = std::move(slices[2]);
    return Finish(std::move(n));
  }

  absl::StatusOr<NodePtr> ParseMember(NodePtr object) {
    while (Is(TokenType::kDot) || Is(TokenType::kOpenSquareBracket)) {
      const bool computed = Is(TokenType::kOpenSquareBracket);
      NodePtr n = Make(NodeKind::kMember);
      ++current_;
      NodePtr property;
      if (computed) {
        SPLITMOE_ASSIGN_OR_RETURN(property, ParseSubscript());
        SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseSquareBracket, "']'").status());
      } else {
        SPLITMOE_ASSIGN_OR_RETURN(property, ParsePrimary());
        if (property->kind != NodeKind::kIdentifier && property->kind != NodeKind::kInt) {
          return ErrorAt(property->line, property->column,
                         "expected an identifier or integer after '.'");
        }
      }
      n->a = std::move(object);
      n->b = std::move(property);
      n->flag = computed;
      SPLITMOE_ASSIGN_OR_RETURN(object, Finish(std::move(n)));
    }
    return object;
  }

  absl::StatusOr<NodePtr> ParseMultiplicative() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr left, ParsePower());
    while (Is(TokenType::kMultiplicativeBinaryOperator)) {
      std::string op = tokens_[current_++].value;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr right, ParsePower());
      SPLITMOE_ASSIGN_OR_RETURN(left, Binary(std::move(op), std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParsePower() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr left, ParseTest());
    while (Is(TokenType::kExponentiationBinaryOperator)) {
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr right, ParseTest());
      SPLITMOE_ASSIGN_OR_RETURN(left, Binary("**", std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<NodePtr> ParseTest() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr operand, ParseFilter());
    while (IsIdentifier("is")) {
      NodePtr n = Make(NodeKind::kTest);
      ++current_;
      n->flag = IsIdentifier("not");
      if (n->flag) ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr test, ParsePrimary());
      if (test->kind != NodeKind::kIdentifier) {
        return ErrorAt(test->line, test->column, "expected the name of a test after 'is'");
      }
      n->name = test->name;
      n->a = std::move(operand);
      SPLITMOE_ASSIGN_OR_RETURN(operand, Finish(std::move(n)));
    }
    return operand;
  }

  absl::StatusOr<NodePtr> ParseFilter() {
    SPLITMOE_ASSIGN_OR_RETURN(NodePtr operand, ParseUnarySign());
    while (Is(TokenType::kPipe)) {
      NodePtr n = Make(NodeKind::kFilter);
      ++current_;
      SPLITMOE_ASSIGN_OR_RETURN(NodePtr filter, ParsePrimary());
      if (filter->kind != NodeKind::kIdentifier) {
        return ErrorAt(filter->line, filter->column, "expected the name of a filter after '|'");
      }
      if (Is(TokenType::kOpenParen)) {
        SPLITMOE_ASSIGN_OR_RETURN(filter, ParseCall(std::move(filter)));
      }
      n->a = std::move(operand);
      n->b = std::move(filter);
      SPLITMOE_ASSIGN_OR_RETURN(operand, Finish(std::move(n)));
    }
    return operand;
  }

  absl::StatusOr<NodePtr> ParseUnarySign() {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("expression nested too deeply");
    if (!AtEnd()) {
      const Token& t = tokens_[current_];
      if ((t.type == TokenType::kUnaryOperator || t.type == TokenType::kAdditiveBinaryOperator) &&
          (t.value == "-" || t.value == "+")) {
        NodePtr n = Make(NodeKind::kUnary);
        n->name = t.value;
        ++current_;
        SPLITMOE_ASSIGN_OR_RETURN(n->a, ParseUnarySign());
        return Finish(std::move(n));
      }
    }
    return ParseCallMember();
  }

  absl::StatusOr<NodePtr> ParsePrimary() {
    DepthGuard guard(this);
    if (guard.exceeded()) return Error("expression nested too deeply");
    if (AtEnd()) return Error("expected an expression");
    const Token& t = tokens_[current_];
    NodePtr n = Make(NodeKind::kIdentifier);
    ++current_;
    switch (t.type) {
      case TokenType::kNumericLiteral:
        n->kind = absl::StrContains(t.value, '.') ? NodeKind::kFloat : NodeKind::kInt;
        n->number = JsParseFloat(t.value);
        return n;
      case TokenType::kStringLiteral:
        n->kind = NodeKind::kString;
        n->name = t.value;
        while (Is(TokenType::kStringLiteral)) n->name += tokens_[current_++].value;
        return n;
      case TokenType::kIdentifier:
        n->name = t.value;
        return n;
      case TokenType::kOpenParen: {
        SPLITMOE_ASSIGN_OR_RETURN(NodePtr e, ParseExpressionSequence(false));
        SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kCloseParen, "')'").status());
        return e;
      }
      case TokenType::kOpenSquareBracket: {
        n->kind = NodeKind::kArray;
        while (!Is(TokenType::kCloseSquareBracket)) {
          SPLITMOE_ASSIGN_OR_RETURN(NodePtr e, ParseExpression());
          n->list.push_back(std::move(e));
          if (Is(TokenType::kComma)) ++current_;
        }
        ++current_;
        return Finish(std::move(n));
      }
      case TokenType::kOpenCurlyBracket: {
        n->kind = NodeKind::kObject;
        while (!Is(TokenType::kCloseCurlyBracket)) {
          SPLITMOE_ASSIGN_OR_RETURN(NodePtr key, ParseExpression());
          SPLITMOE_RETURN_IF_ERROR(Expect(TokenType::kColon, "':' after a dict key").status());
          SPLITMOE_ASSIGN_OR_RETURN(NodePtr value, ParseExpression());
          n->list.push_back(std::move(key));
          n->list2.push_back(std::move(value));
          if (Is(TokenType::kComma)) ++current_;
        }
        ++current_;
        return Finish(std::move(n));
      }
      default:
        --current_;
        return Error(absl::StrCat("unexpected ", TokenTypeName(t.type), " '", t.value, "'"));
    }
  }

  const std::vector<Token>& tokens_;
  size_t current_ = 0;
  int depth_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Node>> Parse(const std::vector<Token>& tokens) {
  Parser parser(tokens);
  return parser.Run();
}

}  // namespace splitmoe::chat::internal
