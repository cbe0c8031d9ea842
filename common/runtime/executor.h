// Executors: where an actor's long work runs, so that no handler computes for long or waits.
// The actor hands a task to its executor and returns; the task ends by sending the actor a
// message with its result (the actor's ref is safe to use from any thread, also after the actor
// is gone). The task may read and write only what the actor has handed over to it until that
// message arrives.
//
//   // in a handler:
//   executor_->Run([this, self = ctx.self()] { self.Send(StepDone{decoder_.Step()}); });
//
// ThreadExecutor runs tasks in order on one thread of its own; its destructor runs what is
// queued, then joins (so own it after everything its tasks touch). ManualExecutor (tests) runs
// nothing until told, so a test can deliver messages while a task is "in flight".
#ifndef SPLITMOE_COMMON_RUNTIME_EXECUTOR_H_
#define SPLITMOE_COMMON_RUNTIME_EXECUTOR_H_

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace splitmoe::runtime {

class Executor {
 public:
  virtual ~Executor() = default;
  // Queues `task`; never blocks and never runs it on the caller's stack (except InlineExecutor).
  virtual void Run(std::function<void()> task) = 0;
};

class ThreadExecutor : public Executor {
 public:
  explicit ThreadExecutor(std::string name);
  ~ThreadExecutor() override;
  ThreadExecutor(const ThreadExecutor&) = delete;
  ThreadExecutor& operator=(const ThreadExecutor&) = delete;

  void Run(std::function<void()> task) override;

 private:
  void Loop();

  std::string name_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  std::thread thread_;                       // last: starts once the rest exists
};

// Runs each task at once, on the caller's thread (tests whose scheduler is manual anyway).
class InlineExecutor : public Executor {
 public:
  void Run(std::function<void()> task) override { task(); }
};

// Holds tasks until the test runs them. Thread-safe.
class ManualExecutor : public Executor {
 public:
  void Run(std::function<void()> task) override;
  // Runs the oldest queued task; false when none.
  bool RunOne();
  // Runs tasks (also ones queued meanwhile) until none is left; returns how many ran.
  size_t RunAll();
  size_t queued() const;

 private:
  mutable std::mutex mu_;
  std::deque<std::function<void()>> tasks_;
};

}  // namespace splitmoe::runtime

#endif  // SPLITMOE_COMMON_RUNTIME_EXECUTOR_H_
