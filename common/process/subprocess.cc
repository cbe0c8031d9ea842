#include "common/process/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>

#include "absl/strings/str_cat.h"

extern char** environ;

namespace splitmoe::process {
namespace {

std::string Describe(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("killed by signal ", WTERMSIG(status));
  return "ended";
}

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(const std::string& name,
                                                              const std::vector<std::string>& argv,
                                                              const std::vector<std::string>& env) {
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
  // Everything the child needs is prepared before fork: only async-signal-safe calls after it.
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  for (const std::string& e : env) env_strings.push_back(e);
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    ::setpgid(0, 0);
    // A child never outlives its parent, even one that crashed or was SIGKILLed.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    ::dup2(out[1], 1);
    ::execve(args[0], args.data(), envp.data());
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also from the parent: no race with an early Signal()
  ::close(out[1]);
  std::unique_ptr<Subprocess> p(new Subprocess());
  p->name_ = name;
  p->pid_ = pid;
  p->stdout_fd_ = out[0];
  return p;
}

Subprocess::~Subprocess() {
  if (pid_ > 0 && !exit_) Terminate(absl::Seconds(5));
  if (stdout_fd_ >= 0) ::close(stdout_fd_);
}

absl::StatusOr<std::string> Subprocess::ReadLineMatching(const std::string& prefix,
                                                         absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    size_t nl;
    while ((nl = buffer_.find('\n')) != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (line.rfind(prefix, 0) == 0) return line.substr(prefix.size());
      std::cerr << "[" << name_ << "] " << line << "\n";
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(
          absl::StrCat(name_, ": no '", prefix, "' line within ", absl::FormatDuration(timeout)));
    }
    pollfd fd{stdout_fd_, POLLIN, 0};
    const int ms = static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(left), 200));
    const int ready = ::poll(&fd, 1, ms);
    if (ready > 0) {
      char buf[4096];
      const ssize_t n = ::read(stdout_fd_, buf, sizeof(buf));
      if (n > 0) {
        buffer_.append(buf, static_cast<size_t>(n));
        continue;
      }
      // EOF: the child closed stdout, usually because it exited.
      std::string why = Terminate(absl::Seconds(2));
      return absl::UnavailableError(
          absl::StrCat(name_, " ", why, " before printing '", prefix, "'"));
    }
    if (auto ended = Poll()) {
      return absl::UnavailableError(
          absl::StrCat(name_, " ", *ended, " before printing '", prefix, "'"));
    }
  }
}

std::optional<std::string> Subprocess::Poll() {
  if (exit_) return exit_;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) exit_ = Describe(status);
  return exit_;
}

void Subprocess::Signal(int signal) {
  if (!exit_) ::kill(-pid_, signal);
}

std::string Subprocess::Terminate(absl::Duration grace) {
  if (Poll()) return *exit_;
  Signal(SIGTERM);
  const absl::Time deadline = absl::Now() + grace;
  while (absl::Now() < deadline) {
    if (Poll()) return *exit_;
    absl::SleepFor(absl::Milliseconds(20));
  }
  Signal(SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  exit_ = Describe(status) + " (after SIGKILL)";
  return *exit_;
}

}  // namespace splitmoe::process
