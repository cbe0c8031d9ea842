#include "common/base/log.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/base/utf8.h"

namespace splitmoe::log {
namespace {

std::atomic<int> min_level{static_cast<int>(Level::kInfo)};
std::atomic<int> format{static_cast<int>(Format::kText)};

const char* Name(Level level) {
  switch (level) {
    case Level::kDebug:
      return "debug";
    case Level::kInfo:
      return "info";
    case Level::kWarning:
      return "warning";
    case Level::kError:
      return "error";
  }
  return "info";
}

// A value as key=value text: bare when it has no space, quote or equals sign, else quoted with
// backslash escapes.
std::string TextValue(absl::string_view v) {
  bool bare = !v.empty();
  for (char c : v) {
    if (c == ' ' || c == '"' || c == '=' || c == '\\' || static_cast<unsigned char>(c) < 0x20) {
      bare = false;
      break;
    }
  }
  if (bare) return std::string(v);
  std::string out = "\"";
  for (char c : v) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppend(&out, "\\x", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string JsonString(absl::string_view raw) {
  // UTF-8 passes through; an ill-formed sequence becomes U+FFFD, so the line stays JSON.
  std::string v;
  utf8::AppendUtf8Lossy(raw, /*final=*/true, &v);
  std::string out = "\"";
  for (size_t i = 0; i < v.size(); ++i) {
    const char c = v[i];
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppend(&out, "\\u00", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

}  // namespace

absl::Status Configure(absl::string_view level, absl::string_view fmt) {
  const std::string l = absl::AsciiStrToLower(level);
  if (!l.empty()) {
    if (l == "debug") {
      min_level = static_cast<int>(Level::kDebug);
    } else if (l == "info") {
      min_level = static_cast<int>(Level::kInfo);
    } else if (l == "warning" || l == "warn") {
      min_level = static_cast<int>(Level::kWarning);
    } else if (l == "error") {
      min_level = static_cast<int>(Level::kError);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "--log-level must be debug, info, warning or error, got '", level, "'"));
    }
  }
  const std::string f = absl::AsciiStrToLower(fmt);
  if (!f.empty()) {
    if (f == "text" || f == "logfmt") {
      format = static_cast<int>(Format::kText);
    } else if (f == "json") {
      format = static_cast<int>(Format::kJson);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--log-format must be text or json, got '", fmt, "'"));
    }
  }
  return absl::OkStatus();
}

absl::Status ConfigureFromEnvironment() {
  const char* level = std::getenv("SPLITMOE_LOG_LEVEL");
  const char* fmt = std::getenv("SPLITMOE_LOG_FORMAT");
  return Configure(level != nullptr ? level : "", fmt != nullptr ? fmt : "");
}

bool Enabled(Level level) { return static_cast<int>(level) >= min_level.load(); }

std::string FormatRecord(Level level, absl::string_view component, absl::string_view message,
                         const std::vector<std::pair<std::string, std::string>>& fields,
                         Format fmt, absl::string_view time) {
  std::string line;
  if (fmt == Format::kJson) {
    absl::StrAppend(&line, "{\"ts\":", JsonString(time), ",\"level\":\"", Name(level),
                    "\",\"component\":", JsonString(component), ",\"msg\":", JsonString(message));
    for (const auto& [k, v] : fields) absl::StrAppend(&line, ",", JsonString(k), ":", JsonString(v));
    line += "}";
    return line;
  }
  absl::StrAppend(&line, "ts=", time, " level=", Name(level), " component=",
                  TextValue(component), " msg=", TextValue(message));
  for (const auto& [k, v] : fields) absl::StrAppend(&line, " ", k, "=", TextValue(v));
  return line;
}

Record::~Record() {
  const std::string time =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone());
  std::string line = FormatRecord(level_, component_, message_.str(), fields_,
                                  static_cast<Format>(format.load()), time);
  line += "\n";
  // One write per record: lines of several threads do not interleave.
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(2, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

}  // namespace splitmoe::log
