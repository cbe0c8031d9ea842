// Subprocess: a child process of the launcher (`splitmoe up`) and of the end-to-end tests — the
// real role binaries started on loopback. The child gets its own process group (so a whole role
// and anything it spawned can be signalled at once), its stdout is read line by line (roles
// announce "listening HOST:PORT" there), and its stderr is passed through with a name prefix.
// Owned by one thread; the destructor terminates a child still running (SIGTERM, then SIGKILL
// after the grace period), so no test or launcher leaves processes behind.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto child, Subprocess::Start("expert0", {bin, "expert", ...}));
//   SPLITMOE_ASSIGN_OR_RETURN(std::string line, child->ReadLineMatching("listening ",
//   absl::Seconds(60)));
//   ...
//   child->Terminate(absl::Seconds(5));
#ifndef SPLITMOE_COMMON_PROCESS_SUBPROCESS_H_
#define SPLITMOE_COMMON_PROCESS_SUBPROCESS_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace splitmoe::process {

class Subprocess {
 public:
  // argv[0] is the executable path. `env` entries ("NAME=value") are added to this process's
  // environment. stdin is /dev/null.
  static absl::StatusOr<std::unique_ptr<Subprocess>> Start(
      const std::string& name, const std::vector<std::string>& argv,
      const std::vector<std::string>& env = {});
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  const std::string& name() const { return name_; }
  pid_t pid() const { return pid_; }

  // Reads stdout lines until one starts with `prefix` (returned without it) or the timeout
  // passes (DeadlineExceeded) or the child exits (Unavailable, with its exit status). Lines that
  // do not match are echoed to stderr with the name prefix.
  absl::StatusOr<std::string> ReadLineMatching(const std::string& prefix, absl::Duration timeout);

  // Non-blocking: the exit description ("exited with code 3", "killed by signal 9") once the
  // child has ended, else nullopt.
  std::optional<std::string> Poll();
  // Sends SIGTERM to the child's process group, waits up to `grace`, then SIGKILLs it. Returns
  // the exit description.
  std::string Terminate(absl::Duration grace);
  // Sends `signal` to the process group.
  void Signal(int signal);

 private:
  Subprocess() = default;
  std::string name_;
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string buffer_;
  std::optional<std::string> exit_;
};

}  // namespace splitmoe::process

#endif  // SPLITMOE_COMMON_PROCESS_SUBPROCESS_H_
