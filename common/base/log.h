// The one logger of every splitmoe process: levels, one line per record, key=value (default) or
// JSON (`--log-format json`), written to stderr whole (records from several threads never
// interleave). Each record has a time (UTC, microseconds), a level, a component and a message,
// and may carry fields:
//
//   SPLITMOE_LOG(INFO, "router") << "worker stopped heartbeating: out of service";
//   SPLITMOE_LOG(WARNING, "decode").With("reservation", id).With("request", rid)
//       << "released after its deadline";
//
// prints
//   ts=2026-12-07T01:40:00.123456Z level=warning component=decode msg="released after its
//   deadline" reservation=17 request=cmpl-3f...
// or {"ts":"...","level":"warning","component":"decode","msg":"...","reservation":"17",...}.
// Records below the level (`--log-level debug|info|warning|error`, default info; also
// SPLITMOE_LOG_LEVEL and SPLITMOE_LOG_FORMAT in the environment) cost one comparison.
#ifndef SPLITMOE_COMMON_BASE_LOG_H_
#define SPLITMOE_COMMON_BASE_LOG_H_

#include <atomic>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace splitmoe::log {

enum class Level { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class Format { kText, kJson };
// The names SPLITMOE_LOG takes.
inline constexpr Level kLevel_DEBUG = Level::kDebug;
inline constexpr Level kLevel_INFO = Level::kInfo;
inline constexpr Level kLevel_WARNING = Level::kWarning;
inline constexpr Level kLevel_ERROR = Level::kError;

// Sets the level and format; InvalidArgument for an unknown name (the flag's values).
absl::Status Configure(absl::string_view level, absl::string_view format);
// Reads SPLITMOE_LOG_LEVEL / SPLITMOE_LOG_FORMAT (unset: info, text).
absl::Status ConfigureFromEnvironment();
bool Enabled(Level level);

class Record {
 public:
  Record(Level level, absl::string_view component) : level_(level), component_(component) {}
  ~Record();
  Record(const Record&) = delete;
  Record& operator=(const Record&) = delete;

  template <typename T>
  Record& With(absl::string_view key, const T& value) {
    std::ostringstream v;
    v << value;
    fields_.emplace_back(std::string(key), v.str());
    return *this;
  }
  template <typename T>
  Record& operator<<(const T& value) {
    message_ << value;
    return *this;
  }

 private:
  Level level_;
  std::string component_;
  std::ostringstream message_;
  std::vector<std::pair<std::string, std::string>> fields_;
};

// The line a record makes (for tests): no trailing newline.
std::string FormatRecord(Level level, absl::string_view component, absl::string_view message,
                         const std::vector<std::pair<std::string, std::string>>& fields,
                         Format format, absl::string_view time);

}  // namespace splitmoe::log

#define SPLITMOE_LOG(level, component)                               \
  if (!::splitmoe::log::Enabled(::splitmoe::log::kLevel_##level)) {  \
  } else                                                             \
    ::splitmoe::log::Record(::splitmoe::log::kLevel_##level, (component))

#endif  // SPLITMOE_COMMON_BASE_LOG_H_
