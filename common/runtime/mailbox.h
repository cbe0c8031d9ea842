// Mailbox<T>: an unbounded multi-producer queue with one consumer in mind: the inbox of an actor.
// Built on std::mutex + std::condition_variable + std::deque rather than absl::Mutex because
// Debian's Abseil is not instrumented for ThreadSanitizer. Any thread may Push and Close; Pop,
// PopFor, PopUntil and TryPop are meant for the owning thread (several consumers are safe, but
// then nothing says which one gets an item). Items come out in the order their Push returned.
//
// SetIdleSpin(d): a consumer that finds the mailbox empty polls it for up to `d` (yielding the
// core) before it blocks, for actors on a latency-critical path (spin.h says why).
//
// Close() stops accepting: Push returns false and leaves its argument untouched, so the caller
// still owns what it tried to send and can fail it properly. What was queued before Close() is
// still handed out; a blocking pop returns std::nullopt only once the mailbox is closed and
// empty (drained()), when its timeout passes, or when Interrupt() asks it to look around.
//
//   Mailbox<Job> inbox;
//   std::thread consumer([&] { while (std::optional<Job> job = inbox.Pop()) Run(*job); });
//   Job job = ...;
//   if (!inbox.Push(std::move(job))) Fail(job);  // closed: `job` was not moved from
//   inbox.Close();                               // consumer drains, then Pop returns nullopt
//   consumer.join();
#ifndef SPLITMOE_COMMON_RUNTIME_MAILBOX_H_
#define SPLITMOE_COMMON_RUNTIME_MAILBOX_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/time/time.h"
#include "common/runtime/spin.h"

namespace splitmoe::runtime {

template <typename T>
class Mailbox {
 public:
  Mailbox() = default;
  Mailbox(const Mailbox&) = delete;
  Mailbox& operator=(const Mailbox&) = delete;

  // Appends `item`; false once Close() was called, in which case `item` is not moved from.
  bool Push(T&& item) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    items_.push_back(std::move(item));
    events_.fetch_add(1, std::memory_order_release);
    // Notified under the lock: a consumer that wakes, drains and destroys the mailbox cannot do so
    // while this producer still touches it.
    cv_.notify_one();
    return true;
  }
  bool Push(const T& item) {
    T copy = item;
    return Push(std::move(copy));
  }

  // Blocks until an item is available (returns it), or returns nullopt when the mailbox is
  // closed and empty or a pending Interrupt() is consumed; drained() tells the two apart.
  std::optional<T> Pop() {
    std::unique_lock<std::mutex> lock(mu_);
    SpinLocked(lock, std::chrono::steady_clock::time_point::max());
    cv_.wait(lock, [this] { return !items_.empty() || closed_ || interrupted_; });
    return TakeFrontLocked();
  }

  // Like Pop, but also gives up with nullopt after `timeout` (or at `deadline`).
  std::optional<T> PopFor(absl::Duration timeout) {
    return PopUntil(std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout));
  }
  std::optional<T> PopUntil(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    SpinLocked(lock, deadline);
    cv_.wait_until(lock, deadline, [this] { return !items_.empty() || closed_ || interrupted_; });
    return TakeFrontLocked();
  }

  // Makes the next blocking pop that finds no item return nullopt at once, waking it if it is
  // blocked now: for a consumer that must re-read something else (an actor whose earliest timer
  // changed). Interrupts do not queue up: several before the next pop count as one.
  void Interrupt() {
    std::lock_guard<std::mutex> lock(mu_);
    interrupted_ = true;
    events_.fetch_add(1, std::memory_order_release);
    cv_.notify_all();
  }

  // Never blocks: the oldest item, or nullopt when there is none right now.
  std::optional<T> TryPop() {
    std::lock_guard<std::mutex> lock(mu_);
    return TakeFrontLocked();
  }

  // Forms of TryPop, Pop and PopUntil that hand the item to `consume(T&&)`, called outside the
  // lock, instead of returning an optional; they return whether there was an item. The actor
  // runtime uses these: g++ 12 warns falsely (-Wmaybe-uninitialized) about a std::optional of a
  // std::variant holding a shared_ptr once the code around it is inlined.
  template <typename F>
  bool TryPopInto(F&& consume) {
    std::unique_lock<std::mutex> lock(mu_);
    return ConsumeFrontLocked(lock, consume);
  }
  template <typename F>
  bool PopInto(F&& consume) {
    std::unique_lock<std::mutex> lock(mu_);
    SpinLocked(lock, std::chrono::steady_clock::time_point::max());
    cv_.wait(lock, [this] { return !items_.empty() || closed_ || interrupted_; });
    return ConsumeFrontLocked(lock, consume);
  }
  template <typename F>
  bool PopUntilInto(std::chrono::steady_clock::time_point deadline, F&& consume) {
    std::unique_lock<std::mutex> lock(mu_);
    SpinLocked(lock, deadline);
    cv_.wait_until(lock, deadline, [this] { return !items_.empty() || closed_ || interrupted_; });
    return ConsumeFrontLocked(lock, consume);
  }

  // How long an empty mailbox is polled before a consumer blocks (0, the default: not at all).
  void SetIdleSpin(absl::Duration spin) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_spin_ = spin;
  }

  // Stops accepting and wakes every blocked consumer. Idempotent.
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    events_.fetch_add(1, std::memory_order_release);
    cv_.notify_all();
  }

  bool closed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_;
  }
  // Closed and empty: nothing will ever come out again.
  bool drained() const {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_ && items_.empty();
  }
  size_t size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return items_.size();
  }

 private:
  // With an idle spin set and nothing to hand out: polls (unlocked) until something happens —
  // a push, close or interrupt — the spin ends or `deadline` passes; returns locked.
  void SpinLocked(std::unique_lock<std::mutex>& lock,
                  std::chrono::steady_clock::time_point deadline) {
    if (idle_spin_ <= absl::ZeroDuration() || !items_.empty() || closed_ || interrupted_) return;
    const uint64_t seen = events_.load(std::memory_order_acquire);
    const absl::Duration spin = idle_spin_;
    lock.unlock();
    SpinFor(spin, [&] {
      return events_.load(std::memory_order_acquire) != seen ||
             std::chrono::steady_clock::now() >= deadline;
    });
    lock.lock();
  }

  template <typename F>
  bool ConsumeFrontLocked(std::unique_lock<std::mutex>& lock, F& consume) {
    if (items_.empty()) {
      interrupted_ = false;
      return false;
    }
    T item(std::move(items_.front()));
    items_.pop_front();
    lock.unlock();
    consume(std::move(item));
    return true;
  }

  std::optional<T> TakeFrontLocked() {
    if (items_.empty()) {
      interrupted_ = false;
      return std::nullopt;
    }
    std::optional<T> item(std::move(items_.front()));
    items_.pop_front();
    return item;
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<T> items_;       // guarded by mu_
  bool closed_ = false;       // guarded by mu_
  bool interrupted_ = false;  // guarded by mu_
  absl::Duration idle_spin_;  // guarded by mu_
  // Counts pushes, closes and interrupts: what a spinning consumer watches without the lock.
  std::atomic<uint64_t> events_{0};
};

}  // namespace splitmoe::runtime

#endif  // SPLITMOE_COMMON_RUNTIME_MAILBOX_H_
