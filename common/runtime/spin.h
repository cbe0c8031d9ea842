// SpinFor: polls `ready` for up to `budget`, yielding the core between looks, before a caller
// blocks. On the project's VMs a thread woken from a futex or epoll costs ~30 us per hand-off
// (a condition-variable ping-pong between two threads measures ~57 us round trip), one that is
// still polling ~1 us: on a latency-critical path (the answer to a MoE batch, the next batch of
// an expert replica) a short poll before sleeping removes most of the hand-off cost. Yielding
// keeps a polling thread from taking a core from a thread with work on it; the budget bounds
// what an idle poll costs. Any thread may call it.
//
//   std::atomic<int> arrived{0};
//   if (!runtime::SpinFor(absl::Microseconds(100), [&] { return arrived.load() > 0; })) {
//     ... block on the condition variable as before ...
//   }
#ifndef SPLITMOE_COMMON_RUNTIME_SPIN_H_
#define SPLITMOE_COMMON_RUNTIME_SPIN_H_

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/time/time.h"

namespace splitmoe::runtime {

// True as soon as `ready()` is; false once `budget` has passed without it (at once for a budget
// of zero or less).
template <typename Ready>
bool SpinFor(absl::Duration budget, Ready&& ready) {
  if (budget <= absl::ZeroDuration()) return ready();
  // At most a second: a longer poll is a mistake, and an infinite budget would overflow.
  const auto until = std::chrono::steady_clock::now() +
                     absl::ToChronoNanoseconds(std::min(budget, absl::Seconds(1)));
  while (true) {
    if (ready()) return true;
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::yield();
  }
}

}  // namespace splitmoe::runtime

#endif  // SPLITMOE_COMMON_RUNTIME_SPIN_H_
