#include "common/chat/internal/lexer.h"

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/chat/internal/unicode.h"

namespace splitmoe::chat::internal {
namespace {

// Text after preprocessing, with the offset in the original source of each byte.
struct MappedText {
  std::string text;
  std::vector<uint32_t> origin;  // origin[i]: source offset of text[i]; one more at the end

  void Append(const MappedText& from, size_t begin, size_t end) {
    text.append(from.text, begin, end - begin);
    origin.insert(origin.end(), from.origin.begin() + static_cast<ptrdiff_t>(begin),
                  from.origin.begin() + static_cast<ptrdiff_t>(end));
  }
  void Finish(const MappedText& from) { origin.push_back(from.origin.back()); }
};

bool IsLineTerminatorAt(const std::string& s, size_t i, size_t* length) {
  if (s[i] == '\n' || s[i] == '\r') {
    *length = 1;
    return true;
  }
  // U+2028, U+2029: E2 80 A8 / E2 80 A9.
  if (static_cast<unsigned char>(s[i]) == 0xE2 && i + 2 < s.size() &&
      static_cast<unsigned char>(s[i + 1]) == 0x80 &&
      (static_cast<unsigned char>(s[i + 2]) == 0xA8 ||
       static_cast<unsigned char>(s[i + 2]) == 0xA9)) {
    *length = 3;
    return true;
  }
  return false;
}

// template.replace(/^[ \t]*({[#%-])/gm, "$1")
MappedText LstripBlocks(const MappedText& in) {
  MappedText out;
  const std::string& s = in.text;
  size_t copied = 0;  // in.text[0, copied) is in `out`
  size_t line_start = 0;
  while (line_start <= s.size()) {
    size_t q = line_start;
    while (q < s.size() && (s[q] == ' ' || s[q] == '\t')) ++q;
    size_t resume = line_start;
    if (q + 1 < s.size() && s[q] == '{' &&
        (s[q + 1] == '#' || s[q + 1] == '%' || s[q + 1] == '-')) {
      out.Append(in, copied, line_start);
      copied = q;
      resume = q + 2;
    }
    // The next line start at or after `resume`.
    size_t i = resume;
    size_t length = 0;
    while (i < s.size() && !IsLineTerminatorAt(s, i, &length)) ++i;
    if (i >= s.size()) break;
    line_start = i + length;
  }
  out.Append(in, copied, s.size());
  out.Finish(in);
  return out;
}

// template.replace(/([#%-]})\n/g, "$1")
MappedText TrimBlocks(const MappedText& in) {
  MappedText out;
  const std::string& s = in.text;
  size_t copied = 0;
  size_t i = 0;
  while (i + 2 < s.size()) {
    if ((s[i] == '#' || s[i] == '%' || s[i] == '-') && s[i + 1] == '}' && s[i + 2] == '\n') {
      out.Append(in, copied, i + 2);
      copied = i + 3;
      i += 3;
    } else {
      ++i;
    }
  }
  out.Append(in, copied, s.size());
  out.Finish(in);
  return out;
}

// Length of the JavaScript whitespace run (\s*) at s[i].
size_t WhitespaceRun(const std::string& s, size_t i) {
  size_t j = i;
  while (j < s.size()) {
    size_t next = j;
    if (!IsJsWhitespace(NextCodePoint(s, &next))) break;
    j = next;
  }
  return j - i;
}

// Matches /{%(-?)\s*(?:end)?generation\s*(-?)%}(\s*)/ at s[i]; fills the groups.
bool MatchGenerationTag(const std::string& s, size_t i, bool* lstrip, bool* rstrip,
                        size_t* after_begin, size_t* end) {
  if (s.compare(i, 2, "{%") != 0) return false;
  size_t j = i + 2;
  *lstrip = j < s.size() && s[j] == '-';
  if (*lstrip) ++j;
  j += WhitespaceRun(s, j);
  if (s.compare(j, 3, "end") == 0 && s.compare(j + 3, 10, "generation") == 0) j += 3;
  if (s.compare(j, 10, "generation") != 0) return false;
  j += 10;
  j += WhitespaceRun(s, j);
  *rstrip = j < s.size() && s[j] == '-';
  if (*rstrip) ++j;
  if (s.compare(j, 2, "%}") != 0) return false;
  j += 2;
  *after_begin = j;
  *end = j + WhitespaceRun(s, j);
  return true;
}

// Removes transformers' {% generation %} / {% endgeneration %} tags.
MappedText RemoveGenerationTags(const MappedText& in) {
  MappedText out;
  const std::string& s = in.text;
  size_t last = 0;
  size_t i = 0;
  while ((i = s.find("{%", i)) != std::string::npos) {
    bool lstrip, rstrip;
    size_t after_begin, end;
    if (!MatchGenerationTag(s, i, &lstrip, &rstrip, &after_begin, &end)) {
      ++i;
      continue;
    }
    size_t kept_end = i;
    while (lstrip && kept_end > last) {
      // Step back over one whitespace code point, if the one ending at kept_end is one.
      size_t start = kept_end - 1;
      while (start > last && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
      size_t probe = start;
      if (!IsJsWhitespace(NextCodePoint(s, &probe))) break;
      kept_end = start;
    }
    out.Append(in, last, kept_end);
    if (!rstrip) out.Append(in, after_begin, end);
    last = end;
    i = end;
  }
  out.Append(in, last, s.size());
  out.Finish(in);
  return out;
}

// Line and column (1-based, columns in code points) of each offset of the original source.
class Positions {
 public:
  explicit Positions(absl::string_view source) : source_(source) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\n') line_starts_.push_back(i + 1);
    }
  }
  // Offsets asked in increasing order (as the lexer does) cost O(distance) each.
  std::pair<int, int> At(size_t offset) const {
    if (offset >= cached_offset_ && offset < next_line_start()) {
      for (size_t i = cached_offset_; i < offset && i < source_.size(); ++i) {
        if ((static_cast<unsigned char>(source_[i]) & 0xC0) != 0x80) ++cached_column_;
      }
      cached_offset_ = offset;
      return {static_cast<int>(cached_line_) + 1, cached_column_};
    }
    size_t lo = 0;
    size_t hi = line_starts_.size();
    while (hi - lo > 1) {
      const size_t mid = (lo + hi) / 2;
      if (line_starts_[mid] <= offset) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    int column = 1;
    for (size_t i = line_starts_[lo]; i < offset && i < source_.size(); ++i) {
      if ((static_cast<unsigned char>(source_[i]) & 0xC0) != 0x80) ++column;
    }
    cached_line_ = lo;
    cached_offset_ = offset;
    cached_column_ = column;
    return {static_cast<int>(lo) + 1, column};
  }

 private:
  size_t next_line_start() const {
    return cached_line_ + 1 < line_starts_.size() ? line_starts_[cached_line_ + 1]
                                                  : source_.size() + 1;
  }

  absl::string_view source_;
  std::vector<size_t> line_starts_;
  mutable size_t cached_line_ = 0;
  mutable size_t cached_offset_ = 0;
  mutable int cached_column_ = 1;
};

bool IsWordByte(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}
bool IsDigitByte(char c) { return c >= '0' && c <= '9'; }

struct Rule {
  const char* text;
  TokenType type;
};

// ORDERED_MAPPING_TABLE, in its order.
constexpr Rule kRules[] = {
    {"{%", TokenType::kOpenStatement},
    {"%}", TokenType::kCloseStatement},
    {"{{", TokenType::kOpenExpression},
    {"}}", TokenType::kCloseExpression},
    {"(", TokenType::kOpenParen},
    {")", TokenType::kCloseParen},
    {"{", TokenType::kOpenCurlyBracket},
    {"}", TokenType::kCloseCurlyBracket},
    {"[", TokenType::kOpenSquareBracket},
    {"]", TokenType::kCloseSquareBracket},
    {",", TokenType::kComma},
    {".", TokenType::kDot},
    {":", TokenType::kColon},
    {"|", TokenType::kPipe},
    {"<=", TokenType::kComparisonBinaryOperator},
    {">=", TokenType::kComparisonBinaryOperator},
    {"==", TokenType::kComparisonBinaryOperator},
    {"!=", TokenType::kComparisonBinaryOperator},
    {"<", TokenType::kComparisonBinaryOperator},
    {">", TokenType::kComparisonBinaryOperator},
    {"+", TokenType::kAdditiveBinaryOperator},
    {"-", TokenType::kAdditiveBinaryOperator},
    {"~", TokenType::kAdditiveBinaryOperator},
    {"**", TokenType::kExponentiationBinaryOperator},
    {"*", TokenType::kMultiplicativeBinaryOperator},
    {"//", TokenType::kMultiplicativeBinaryOperator},
    {"/", TokenType::kMultiplicativeBinaryOperator},
    {"%", TokenType::kMultiplicativeBinaryOperator},
    {"=", TokenType::kEquals},
};

class Lexer {
 public:
  Lexer(const MappedText& src, const Positions& positions)
      : src_(src.text), origin_(src.origin), positions_(positions) {}

  absl::StatusOr<std::vector<Token>> Run();

 private:
  absl::Status Error(size_t at, absl::string_view message) const {
    const auto [line, column] = positions_.At(origin_[std::min(at, origin_.size() - 1)]);
    return absl::InvalidArgumentError(
        absl::StrCat("syntax error at line ", line, " col ", column, ": ", message));
  }
  void Push(TokenType type, std::string value, size_t at) {
    const auto [line, column] = positions_.At(origin_[std::min(at, origin_.size() - 1)]);
    tokens_.push_back(Token{type, std::move(value), line, column});
  }
  char At(size_t i) const { return i < src_.size() ? src_[i] : '\0'; }
  // consumeWhile: fails when the input ends while the predicate still holds.
  template <typename Pred>
  absl::StatusOr<std::string> ConsumeWhile(Pred pred);
  absl::StatusOr<std::string> ConsumeString(char quote);
  void StripTrailingWhitespace();
  void SkipLeadingWhitespace();

  const std::string& src_;
  const std::vector<uint32_t>& origin_;
  const Positions& positions_;
  std::vector<Token> tokens_;
  size_t cursor_ = 0;
  int curly_depth_ = 0;
};

template <typename Pred>
absl::StatusOr<std::string> Lexer::ConsumeWhile(Pred pred) {
  const size_t start = cursor_;
  while (cursor_ < src_.size()) {
    size_t next = cursor_;
    const char32_t cp = NextCodePoint(src_, &next);
    if (!pred(cp)) break;
    cursor_ = next;
    if (cursor_ >= src_.size()) return Error(start, "Unexpected end of input");
  }
  return src_.substr(start, cursor_ - start);
}

absl::StatusOr<std::string> Lexer::ConsumeString(char quote) {
  const size_t open = cursor_ - 1;
  std::string str;
  size_t start = cursor_;
  while (true) {
    if (cursor_ >= src_.size()) return Error(open, "Unexpected end of input (unclosed string)");
    const char c = src_[cursor_];
    if (c == quote) break;
    ++cursor_;
    if (c != '\\') continue;
    str.append(src_, start, cursor_ - 1 - start);
    if (cursor_ >= src_.size()) return Error(open, "Unexpected end of input (unclosed string)");
    const char escaped = src_[cursor_++];
    if (escaped == 'x' || escaped == 'u') {
      const size_t length = escaped == 'x' ? 2 : 4;
      auto hex_at = [&](size_t at, uint32_t* value) {
        if (at + length > src_.size()) return false;
        uint32_t v = 0;
        for (size_t k = 0; k < length; ++k) {
          const char h = src_[at + k];
          int d = IsDigitByte(h)           ? h - '0'
                  : (h >= 'a' && h <= 'f') ? h - 'a' + 10
                  : (h >= 'A' && h <= 'F') ? h - 'A' + 10
                                           : -1;
          if (d < 0) return false;
          v = v * 16 + static_cast<uint32_t>(d);
        }
        *value = v;
        return true;
      };
      uint32_t cp;
      if (!hex_at(cursor_, &cp)) {
        return Error(cursor_ - 2, absl::StrCat("Invalid hexadecimal escape sequence: \\",
                                               std::string(1, escaped)));
      }
      cursor_ += length;
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        // A JavaScript string holds UTF-16: a pair of \u escapes makes one code point.
        uint32_t low;
        if (escaped == 'u' && At(cursor_) == '\\' && At(cursor_ + 1) == 'u' &&
            hex_at(cursor_ + 2, &low) && low >= 0xDC00 && low <= 0xDFFF) {
          cursor_ += 6;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        } else {
          return Error(cursor_ - 6, "unsupported: a \\u escape of an unpaired UTF-16 surrogate");
        }
      } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        return Error(cursor_ - 6, "unsupported: a \\u escape of an unpaired UTF-16 surrogate");
      }
      AppendUtf8(cp, &str);
    } else {
      switch (escaped) {
        case 'n':
          str.push_back('\n');
          break;
        case 't':
          str.push_back('\t');
          break;
        case 'r':
          str.push_back('\r');
          break;
        case 'b':
          str.push_back('\b');
          break;
        case 'f':
          str.push_back('\f');
          break;
        case 'v':
          str.push_back('\v');
          break;
        case '\'':
        case '"':
        case '\\':
          str.push_back(escaped);
          break;
        default: {
          size_t p = cursor_ - 1;
          std::string ch;
          AppendUtf8(NextCodePoint(src_, &p), &ch);
          return Error(cursor_ - 2, absl::StrCat("Unexpected escaped character: ", ch));
        }
      }
    }
    start = cursor_;
  }
  str.append(src_, start, cursor_ - start);
  return str;
}

void Lexer::StripTrailingWhitespace() {
  if (tokens_.empty() || tokens_.back().type != TokenType::kText) return;
  Token& last = tokens_.back();
  last.value = std::string(JsTrimEnd(last.value));
  if (last.value.empty()) tokens_.pop_back();
}

void Lexer::SkipLeadingWhitespace() {
  while (cursor_ < src_.size()) {
    size_t next = cursor_;
    if (!IsJsWhitespace(NextCodePoint(src_, &next))) break;
    cursor_ = next;
  }
}

absl::StatusOr<std::vector<Token>> Lexer::Run() {
  const size_t length = src_.size();
  while (cursor_ < length) {
    const bool have_last = !tokens_.empty();
    const TokenType last_type = have_last ? tokens_.back().type : TokenType::kText;

    // Text outside statements, expressions and comments.
    if (!have_last || last_type == TokenType::kCloseStatement ||
        last_type == TokenType::kCloseExpression || last_type == TokenType::kComment) {
      size_t end = cursor_;
      while (true) {
        end = src_.find('{', end);
        if (end == std::string::npos) {
          end = length;
          break;
        }
        const char next = At(end + 1);
        if (next == '%' || next == '{' || next == '#') break;
        ++end;
      }
      if (end > cursor_) {
        Push(TokenType::kText, src_.substr(cursor_, end - cursor_), cursor_);
        cursor_ = end;
        continue;
      }
    }

    if (src_[cursor_] == '{') {
      const char next = At(cursor_ + 1);
      if (next == '#') {
        const size_t open = cursor_;
        cursor_ += 2;
        const bool strip_before = At(cursor_) == '-';
        if (strip_before) ++cursor_;
        const size_t end = src_.find("#}", cursor_);
        if (end == std::string::npos) return Error(open, "Missing end of comment tag");
        std::string comment = src_.substr(cursor_, end - cursor_);
        const bool strip_after = !comment.empty() && comment.back() == '-';
        if (strip_after) comment.pop_back();
        if (strip_before) StripTrailingWhitespace();
        Push(TokenType::kComment, std::move(comment), open);
        cursor_ = end + 2;
        if (strip_after) SkipLeadingWhitespace();
        continue;
      }
      if (At(cursor_ + 2) == '-') {
        if (next == '%') {
          StripTrailingWhitespace();
          Push(TokenType::kOpenStatement, "{%", cursor_);
          cursor_ += 3;
          continue;
        }
        if (next == '{') {
          StripTrailingWhitespace();
          Push(TokenType::kOpenExpression, "{{", cursor_);
          curly_depth_ = 0;
          cursor_ += 3;
          continue;
        }
      }
    }

    // Whitespace inside statements and expressions.
    {
      absl::StatusOr<std::string> ws = ConsumeWhile(IsJsWhitespace);
      if (!ws.ok()) return ws.status();
    }

    const char ch = src_[cursor_];
    if (ch == '-' && At(cursor_ + 2) == '}') {
      const char next = At(cursor_ + 1);
      if (next == '%') {
        Push(TokenType::kCloseStatement, "%}", cursor_);
        cursor_ += 3;
        SkipLeadingWhitespace();
        continue;
      }
      if (next == '}') {
        Push(TokenType::kCloseExpression, "}}", cursor_);
        cursor_ += 3;
        SkipLeadingWhitespace();
        continue;
      }
    }

    if (ch == '-' || ch == '+') {
      if (!have_last || last_type == TokenType::kText) {
        return Error(cursor_, absl::StrCat("Unexpected character: ", std::string(1, ch)));
      }
      switch (last_type) {
        case TokenType::kIdentifier:
        case TokenType::kNumericLiteral:
        case TokenType::kStringLiteral:
        case TokenType::kCloseParen:
        case TokenType::kCloseSquareBracket:
          break;  // a binary operator
        default: {
          const size_t at = cursor_;
          ++cursor_;
          absl::StatusOr<std::string> num =
              ConsumeWhile([](char32_t c) { return c >= '0' && c <= '9'; });
          if (!num.ok()) return num.status();
          if (!num->empty() && At(cursor_) == '.' && IsDigitByte(At(cursor_ + 1))) {
            ++cursor_;
            absl::StatusOr<std::string> frac =
                ConsumeWhile([](char32_t c) { return c >= '0' && c <= '9'; });
            if (!frac.ok()) return frac.status();
            *num = absl::StrCat(*num, ".", *frac);
          }
          const bool is_number = !num->empty();
          Push(is_number ? TokenType::kNumericLiteral : TokenType::kUnaryOperator,
               absl::StrCat(std::string(1, ch), *num), at);
          continue;
        }
      }
    }

    bool matched = false;
    for (const Rule& rule : kRules) {
      const absl::string_view text(rule.text);
      if (text[0] != ch) continue;
      if (text == "}}" && curly_depth_ > 0) continue;
      if (src_.compare(cursor_, text.size(), text.data(), text.size()) != 0) continue;
      Push(rule.type, std::string(text), cursor_);
      if (rule.type == TokenType::kOpenExpression) {
        curly_depth_ = 0;
      } else if (rule.type == TokenType::kOpenCurlyBracket) {
        ++curly_depth_;
      } else if (rule.type == TokenType::kCloseCurlyBracket) {
        --curly_depth_;
      }
      cursor_ += text.size();
      matched = true;
      break;
    }
    if (matched) continue;

    if (ch == '\'' || ch == '"') {
      const size_t at = cursor_;
      ++cursor_;
      absl::StatusOr<std::string> str = ConsumeString(ch);
      if (!str.ok()) return str.status();
      Push(TokenType::kStringLiteral, *std::move(str), at);
      ++cursor_;
      continue;
    }

    if (IsDigitByte(ch)) {
      const size_t at = cursor_;
      absl::StatusOr<std::string> num =
          ConsumeWhile([](char32_t c) { return c >= '0' && c <= '9'; });
      if (!num.ok()) return num.status();
      if (last_type != TokenType::kDot && At(cursor_) == '.' && IsDigitByte(At(cursor_ + 1))) {
        ++cursor_;
        absl::StatusOr<std::string> frac =
            ConsumeWhile([](char32_t c) { return c >= '0' && c <= '9'; });
        if (!frac.ok()) return frac.status();
        *num = absl::StrCat(*num, ".", *frac);
      }
      Push(TokenType::kNumericLiteral, *std::move(num), at);
      continue;
    }
    if (IsWordByte(ch)) {
      const size_t at = cursor_;
      absl::StatusOr<std::string> word =
          ConsumeWhile([](char32_t c) { return c < 0x80 && IsWordByte(static_cast<char>(c)); });
      if (!word.ok()) return word.status();
      Push(TokenType::kIdentifier, *std::move(word), at);
      continue;
    }
    size_t p = cursor_;
    std::string bad;
    AppendUtf8(NextCodePoint(src_, &p), &bad);
    return Error(cursor_, absl::StrCat("Unexpected character: ", bad));
  }
  return std::move(tokens_);
}

}  // namespace

const char* TokenTypeName(TokenType type) {
  switch (type) {
    case TokenType::kText:
      return "Text";
    case TokenType::kNumericLiteral:
      return "NumericLiteral";
    case TokenType::kStringLiteral:
      return "StringLiteral";
    case TokenType::kIdentifier:
      return "Identifier";
    case TokenType::kEquals:
      return "Equals";
    case TokenType::kOpenParen:
      return "OpenParen";
    case TokenType::kCloseParen:
      return "CloseParen";
    case TokenType::kOpenStatement:
      return "OpenStatement";
    case TokenType::kCloseStatement:
      return "CloseStatement";
    case TokenType::kOpenExpression:
      return "OpenExpression";
    case TokenType::kCloseExpression:
      return "CloseExpression";
    case TokenType::kOpenSquareBracket:
      return "OpenSquareBracket";
    case TokenType::kCloseSquareBracket:
      return "CloseSquareBracket";
    case TokenType::kOpenCurlyBracket:
      return "OpenCurlyBracket";
    case TokenType::kCloseCurlyBracket:
      return "CloseCurlyBracket";
    case TokenType::kComma:
      return "Comma";
    case TokenType::kDot:
      return "Dot";
    case TokenType::kColon:
      return "Colon";
    case TokenType::kPipe:
      return "Pipe";
    case TokenType::kAdditiveBinaryOperator:
      return "AdditiveBinaryOperator";
    case TokenType::kMultiplicativeBinaryOperator:
      return "MultiplicativeBinaryOperator";
    case TokenType::kExponentiationBinaryOperator:
      return "ExponentiationBinaryOperator";
    case TokenType::kComparisonBinaryOperator:
      return "ComparisonBinaryOperator";
    case TokenType::kUnaryOperator:
      return "UnaryOperator";
    case TokenType::kComment:
      return "Comment";
  }
  return "?";
}

absl::StatusOr<std::vector<Token>> Tokenize(absl::string_view source) {
  if (source.size() > kMaxTemplateBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "template is ", source.size(), " bytes; at most ", kMaxTemplateBytes, " are accepted"));
  }
  if (!IsValidUtf8(source)) return absl::InvalidArgumentError("template is not valid UTF-8");
  MappedText text;
  text.text = std::string(source);
  text.origin.resize(source.size() + 1);
  for (size_t i = 0; i <= source.size(); ++i) text.origin[i] = static_cast<uint32_t>(i);
  if (!text.text.empty() && text.text.back() == '\n') {
    text.text.pop_back();
    text.origin.erase(text.origin.end() - 2);
  }
  text = RemoveGenerationTags(TrimBlocks(LstripBlocks(text)));
  const Positions positions(source);
  Lexer lexer(text, positions);
  return lexer.Run();
}

}  // namespace splitmoe::chat::internal
