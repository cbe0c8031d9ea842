#include "common/runtime/manual_scheduler.h"

#include <algorithm>
#include <vector>

namespace splitmoe::runtime::internal {

uint64_t SchedulerQueue::Attach(Runnable* runnable) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  attached_.emplace(id, runnable);
  return id;
}

void SchedulerQueue::Detach(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  attached_.erase(id);
}

bool SchedulerQueue::PushAndRecord(uint64_t id, absl::FunctionRef<bool()> push) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!push()) return false;
  ready_.push_back(id);
  return true;
}

void SchedulerQueue::AddWake(TimePoint deadline, uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  wakes_.emplace(std::make_pair(deadline, next_wake_seq_++), id);
}

TimePoint SchedulerQueue::Now() const {
  std::lock_guard<std::mutex> lock(mu_);
  return now_;
}

size_t SchedulerQueue::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_.size();
}

Runnable* SchedulerQueue::Find(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = attached_.find(id);
  return it == attached_.end() ? nullptr : it->second;
}

bool SchedulerQueue::Step() {
  while (true) {
    uint64_t id = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ready_.empty()) return false;
      id = ready_.front();
      ready_.pop_front();
    }
    // Runs without mu_: the handler sends, and those sends record here. The runnable cannot be
    // destroyed meanwhile, since only this thread destroys actors attached to the scheduler.
    Runnable* runnable = Find(id);
    // No runnable: the actor was destroyed. No message: a draining Stop() already handled it.
    if (runnable != nullptr && runnable->RunOne()) return true;
  }
}

bool SchedulerQueue::DeliverDueWakes() {
  std::vector<uint64_t> due;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!wakes_.empty() && wakes_.begin()->first.first <= now_) {
      due.push_back(wakes_.begin()->second);
      wakes_.erase(wakes_.begin());
    }
  }
  for (uint64_t id : due) {
    if (Runnable* runnable = Find(id)) runnable->DeliverDueTimers();
  }
  return !due.empty();
}

size_t SchedulerQueue::RunUntilIdle() {
  size_t handled = 0;
  do {
    while (Step()) ++handled;
  } while (DeliverDueWakes());
  return handled;
}

size_t SchedulerQueue::AdvanceBy(absl::Duration delay) {
  size_t handled = RunUntilIdle();
  TimePoint target;
  {
    std::lock_guard<std::mutex> lock(mu_);
    target = now_ + std::chrono::duration_cast<Clock::duration>(
                        absl::ToChronoNanoseconds(std::max(delay, absl::ZeroDuration())));
  }
  while (true) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (wakes_.empty() || wakes_.begin()->first.first > target) {
        now_ = target;
        break;
      }
      now_ = std::max(now_, wakes_.begin()->first.first);
    }
    handled += RunUntilIdle();
  }
  return handled + RunUntilIdle();
}

}  // namespace splitmoe::runtime::internal
