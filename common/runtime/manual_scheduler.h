// ManualScheduler: a deterministic executor for tests (CAF's test coordinator, in small). Actors
// constructed with a ManualScheduler own no thread; their messages wait until the test steps
// them, in the global order in which they were sent, and their timers run on a virtual clock that
// only moves when the test says so. A test can therefore assert exactly which handler ran when.
//
// The scheduler and every actor attached to it are driven from one thread (the test's): Step,
// RunUntilIdle, AdvanceBy, and constructing, stopping and destroying those actors. Sends may come
// from any thread. Destroying the scheduler before its actors is safe; they just stop running.
//
//   ManualScheduler scheduler;
//   Actor<Pinger> pinger("pinger", std::make_unique<Pinger>(), &scheduler);
//   pinger.Send(Start{});
//   EXPECT_TRUE(scheduler.Step());                       // runs Pinger::Handle(Start)
//   EXPECT_EQ(scheduler.RunUntilIdle(), 3);              // everything that follows
//   scheduler.AdvanceBy(absl::Seconds(1));               // fires timers due within 1 s
#ifndef SPLITMOE_COMMON_RUNTIME_MANUAL_SCHEDULER_H_
#define SPLITMOE_COMMON_RUNTIME_MANUAL_SCHEDULER_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/time/time.h"

namespace splitmoe::runtime {

template <typename State, typename Message>
class Actor;

namespace internal {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;

// One actor as the scheduler drives it. Implemented by Actor; called on the scheduler's thread.
class Runnable {
 public:
  virtual ~Runnable() = default;
  // Handles the oldest queued message of this actor; false when there was none.
  virtual bool RunOne() = 0;
  // Moves this actor's timer messages that are due at the scheduler's Now() into its mailbox.
  virtual void DeliverDueTimers() = 0;
};

// The scheduler's state, shared with the actors attached to it so that a send through an
// ActorRef that outlives both still finds it.
class SchedulerQueue {
 public:
  uint64_t Attach(Runnable* runnable);
  void Detach(uint64_t id);

  // Runs `push` (a push into the mailbox of actor `id`) and, when it succeeds, records that `id`
  // has one more message, atomically, so that the record order is the mailbox order.
  bool PushAndRecord(uint64_t id, absl::FunctionRef<bool()> push);
  // Actor `id` has a timer due at `deadline`.
  void AddWake(TimePoint deadline, uint64_t id);
  TimePoint Now() const;

  bool Step();
  size_t RunUntilIdle();
  size_t AdvanceBy(absl::Duration delay);
  size_t queued() const;

 private:
  Runnable* Find(uint64_t id) const;  // nullptr once detached
  // Delivers the timers of every wake due at now_; false when none was due.
  bool DeliverDueWakes();

  mutable std::mutex mu_;
  TimePoint now_{};                                           // guarded by mu_
  uint64_t next_id_ = 1;                                      // guarded by mu_
  uint64_t next_wake_seq_ = 0;                                // guarded by mu_
  std::map<uint64_t, Runnable*> attached_;                    // guarded by mu_
  std::deque<uint64_t> ready_;                                // one entry per queued message; mu_
  std::map<std::pair<TimePoint, uint64_t>, uint64_t> wakes_;  // (deadline, seq) -> id; mu_
};

}  // namespace internal

class ManualScheduler {
 public:
  ManualScheduler() : queue_(std::make_shared<internal::SchedulerQueue>()) {}
  ManualScheduler(const ManualScheduler&) = delete;
  ManualScheduler& operator=(const ManualScheduler&) = delete;

  // Handles the next message, the one sent earliest among all attached actors; false when no
  // actor has one. Timers do not fire here.
  bool Step() { return queue_->Step(); }
  // Fires the timers due now and handles messages until none is left; returns how many it
  // handled. A handler that keeps sending to itself makes this loop forever.
  size_t RunUntilIdle() { return queue_->RunUntilIdle(); }
  // Moves the virtual clock forward by `delay`, stopping at each timer deadline in between to
  // fire what is due and RunUntilIdle(); returns how many messages it handled in all.
  size_t AdvanceBy(absl::Duration delay) { return queue_->AdvanceBy(delay); }
  // The virtual clock, which starts at the steady clock's epoch; what Context::Now() returns.
  internal::TimePoint Now() const { return queue_->Now(); }
  // Messages waiting (an upper bound: messages of an actor stopped meanwhile still count).
  size_t queued() const { return queue_->queued(); }

 private:
  template <typename State, typename Message>
  friend class Actor;

  std::shared_ptr<internal::SchedulerQueue> queue_;
};

}  // namespace splitmoe::runtime

#endif  // SPLITMOE_COMMON_RUNTIME_MANUAL_SCHEDULER_H_
