// StateActor<State>: an actor that owns one State object and a mailbox; messages are tasks run
// against the state, one at a time, on the actor's own thread. Anything may Post (gRPC handlers,
// the UCX progress thread, other actors); only the actor's thread touches the state. Post returns
// false once Stop() began, so a caller can answer "stopping" instead of losing work. Stop() runs
// what is queued, then joins; the destructor stops.
//
//   StateActor<WorkerRegistry> registry("registry", std::make_unique<WorkerRegistry>(...));
//   registry.Post([reply](WorkerRegistry& r) { reply(r.Status(absl::Now())); });
//   registry.PostAfter(absl::Milliseconds(300), [](WorkerRegistry& r) { r.Sweep(absl::Now()); });
#ifndef SPLITMOE_COMMON_RUNTIME_STATE_ACTOR_H_
#define SPLITMOE_COMMON_RUNTIME_STATE_ACTOR_H_

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "absl/time/time.h"

namespace splitmoe::runtime {

template <typename State>
class StateActor {
 public:
  using Task = std::function<void(State&)>;

  StateActor(std::string name, std::unique_ptr<State> state)
      : name_(std::move(name)), state_(std::move(state)), thread_([this] { Loop(); }) {}
  ~StateActor() { Stop(); }
  StateActor(const StateActor&) = delete;
  StateActor& operator=(const StateActor&) = delete;

  const std::string& name() const { return name_; }

  bool Post(Task task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return false;
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
    return true;
  }

  // Runs `task` after `delay` (timers for heartbeats and sweeps); dropped if stopped first.
  bool PostAfter(absl::Duration delay, Task task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return false;
      timers_.emplace(std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(delay), std::move(task));
    }
    cv_.notify_one();
    return true;
  }

  // A post function for code that must not know the actor's type.
  std::function<bool(Task)> Poster() {
    return [this](Task t) { return Post(std::move(t)); };
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_ && !thread_.joinable()) return;
      stopping_ = true;
      timers_.clear();
    }
    cv_.notify_one();
    if (thread_.joinable() && std::this_thread::get_id() != thread_.get_id()) thread_.join();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      const auto now = std::chrono::steady_clock::now();
      while (!timers_.empty() && timers_.begin()->first <= now) {
        queue_.push_back(std::move(timers_.begin()->second));
        timers_.erase(timers_.begin());
      }
      if (!queue_.empty()) {
        Task task = std::move(queue_.front());
        queue_.pop_front();
        lock.unlock();
        task(*state_);
        lock.lock();
        continue;
      }
      if (stopping_) return;
      if (timers_.empty()) {
        cv_.wait(lock);
      } else {
        cv_.wait_until(lock, timers_.begin()->first);
      }
    }
  }

  std::string name_;
  std::unique_ptr<State> state_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::multimap<std::chrono::steady_clock::time_point, Task> timers_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts after every other member exists
};

}  // namespace splitmoe::runtime

#endif  // SPLITMOE_COMMON_RUNTIME_STATE_ACTOR_H_
