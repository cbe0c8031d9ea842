#include "common/process/signals.h"

#include <pthread.h>
#include <signal.h>
#include <time.h>

namespace splitmoe::process {
namespace {

sigset_t TerminationSet() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void BlockTerminationSignals() {
  sigset_t set = TerminationSet();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set = TerminationSet();
  int signal = 0;
  sigwait(&set, &signal);
  return signal;
}

int WaitForTerminationSignalFor(absl::Duration timeout) {
  sigset_t set = TerminationSet();
  const timespec ts = absl::ToTimespec(timeout);
  const int signal = sigtimedwait(&set, nullptr, &ts);
  return signal > 0 ? signal : 0;
}

}  // namespace splitmoe::process
