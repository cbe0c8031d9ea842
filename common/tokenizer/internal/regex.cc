#include "common/tokenizer/internal/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cstdint>

#include "absl/strings/str_cat.h"

namespace splitmoe::tokenizer::internal {
namespace {

// Unicode White_Space as a class body (no brackets).
constexpr char kWhiteSpaceClassBody[] =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";
// PCRE2's UCP `\s` is White_Space plus U+180E, so its `\S` lacks U+180E: add it back.
constexpr char kNonWhiteSpaceClassBody[] = "\\S\\x{180E}";

std::string PcreErrorMessage(int code) {
  PCRE2_UCHAR buffer[256];
  int n = pcre2_get_error_message(code, buffer, sizeof(buffer));
  if (n < 0) return absl::StrCat("PCRE2 error ", code);
  return std::string(reinterpret_cast<const char*>(buffer), static_cast<size_t>(n));
}

// Per-thread match state: match data with a one-pair ovector (only the whole match is needed)
// and a JIT stack that can grow to 16 MiB for deeply backtracking matches.
struct ThreadMatchState {
  pcre2_match_data* match_data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;

  ThreadMatchState() {
    match_data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(64 * 1024, 16 * 1024 * 1024, nullptr);
    if (context != nullptr && jit_stack != nullptr) {
      pcre2_jit_stack_assign(context, nullptr, jit_stack);
    }
  }
  ~ThreadMatchState() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(match_data);
  }
};

ThreadMatchState& GetThreadMatchState() {
  thread_local ThreadMatchState state;
  return state;
}

}  // namespace

std::string TranslatePatternForPcre2(absl::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  size_t i = 0;
  const size_t n = pattern.size();
  while (i < n) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < n) {
      const char e = pattern[i + 1];
      if (e == 's') {
        if (in_class) {
          out += kWhiteSpaceClassBody;
        } else {
          absl::StrAppend(&out, "[", kWhiteSpaceClassBody, "]");
        }
      } else if (e == 'S') {
        if (in_class) {
          out += kNonWhiteSpaceClassBody;
        } else {
          absl::StrAppend(&out, "[", kNonWhiteSpaceClassBody, "]");
        }
      } else if (e == 'Q') {
        // Quoted literal text: copy verbatim up to and including \E.
        size_t end = pattern.find("\\E", i + 2);
        end = (end == absl::string_view::npos) ? n : end + 2;
        out.append(pattern.data() + i, end - i);
        i = end;
        continue;
      } else {
        out.push_back(c);
        out.push_back(e);
      }
      i += 2;
      continue;
    }
    if (!in_class) {
      out.push_back(c);
      ++i;
      if (c == '[') {
        in_class = true;
        // A ']' right after '[' or '[^' is a literal member.
        if (i < n && pattern[i] == '^') out.push_back(pattern[i++]);
        if (i < n && pattern[i] == ']') out.push_back(pattern[i++]);
      }
      continue;
    }
    // Inside a class.
    if (c == '[' && i + 1 < n && pattern[i + 1] == ':') {
      size_t end = pattern.find(":]", i + 2);
      if (end != absl::string_view::npos) {
        out.append(pattern.data() + i, end + 2 - i);
        i = end + 2;
        continue;
      }
    }
    if (c == ']') in_class = false;
    out.push_back(c);
    ++i;
  }
  return out;
}

std::string EscapeRegexLiteral(absl::string_view literal) {
  std::string out;
  for (char c : literal) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
      if (u < 0x20 || u == 0x7F) {
        absl::StrAppend(&out, "\\x{", absl::Hex(u), "}");
        continue;
      }
      out.push_back('\\');
    }
    out.push_back(c);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(absl::string_view pattern) {
  std::string translated = TranslatePatternForPcre2(pattern);
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                    PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot compile regex \"", pattern, "\" (as \"", translated,
                     "\"): ", PcreErrorMessage(error_code), " at offset ", error_offset));
  }
  const bool jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  return std::unique_ptr<Regex>(new Regex(std::string(pattern), code, jit));
}

Regex::~Regex() { pcre2_code_free(code_); }

absl::Status Regex::FindAll(absl::string_view subject,
                            std::vector<std::pair<size_t, size_t>>* matches) const {
  ThreadMatchState& state = GetThreadMatchState();
  if (state.match_data == nullptr || state.context == nullptr) {
    return absl::ResourceExhaustedError("cannot allocate PCRE2 match state");
  }
  const auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
  const size_t n = subject.size();
  size_t search_from = 0;
  size_t last_match_end = static_cast<size_t>(-1);
  while (search_from <= n) {
    int rc;
    if (jit_) {
      rc = pcre2_jit_match(code_, data, n, search_from, 0, state.match_data, state.context);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        rc = pcre2_match(code_, data, n, search_from, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                         state.match_data, state.context);
      }
    } else {
      rc = pcre2_match(code_, data, n, search_from, PCRE2_NO_UTF_CHECK, state.match_data,
                       state.context);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("regex \"", pattern_, "\" failed: ", PcreErrorMessage(rc)));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(state.match_data);
    const size_t start = ov[0];
    const size_t end = ov[1];
    if (start == end && end == last_match_end) {
      // Empty match right after the previous match: retry one character further on.
      if (search_from >= n) break;
      size_t next = search_from + 1;
      while (next < n && (static_cast<unsigned char>(subject[next]) & 0xC0) == 0x80) ++next;
      search_from = next;
      continue;
    }
    matches->emplace_back(start, end);
    last_match_end = end;
    if (end == start) {
      if (end >= n) break;
      size_t next = end + 1;
      while (next < n && (static_cast<unsigned char>(subject[next]) & 0xC0) == 0x80) ++next;
      search_from = next;
    } else {
      search_from = end;
    }
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::tokenizer::internal
