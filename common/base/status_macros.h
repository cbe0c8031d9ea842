// Status plumbing for splitmoe. Debian's Abseil (20220623) ships no RETURN_IF_ERROR or
// ASSIGN_OR_RETURN, so these are the project's own. Every fallible path returns absl::Status or
// absl::StatusOr<T>; context is prepended on the way up with Annotate():
//
//   SPLITMOE_RETURN_IF_ERROR(LoadLayer(i));
//   SPLITMOE_ASSIGN_OR_RETURN(Tensor t, checkpoint.Get(name));
//   return Annotate(status, absl::StrCat("loading layer ", i));
#ifndef SPLITMOE_COMMON_BASE_STATUS_MACROS_H_
#define SPLITMOE_COMMON_BASE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace splitmoe {

// Returns `status` with "context: " prepended to its message; OK stays OK.
inline absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace splitmoe

#define SPLITMOE_RETURN_IF_ERROR(expr)                   \
  do {                                                   \
    const absl::Status splitmoe_status_ = (expr);        \
    if (!splitmoe_status_.ok()) return splitmoe_status_; \
  } while (0)

#define SPLITMOE_CONCAT_INNER_(a, b) a##b
#define SPLITMOE_CONCAT_(a, b) SPLITMOE_CONCAT_INNER_(a, b)
#define SPLITMOE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                    \
  if (!tmp.ok()) return tmp.status();                   \
  lhs = std::move(tmp).value()
#define SPLITMOE_ASSIGN_OR_RETURN(lhs, expr) \
  SPLITMOE_ASSIGN_OR_RETURN_IMPL_(SPLITMOE_CONCAT_(splitmoe_statusor_, __LINE__), lhs, expr)

#endif  // SPLITMOE_COMMON_BASE_STATUS_MACROS_H_
