#include "common/engine/overlap.h"

#include <pthread.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace splitmoe::engine {
namespace internal {

// Who may compute: held by at most one pass at a time.
class Baton {
 public:
  void Acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    Take(lock);
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      held_ = false;
    }
    cv_.notify_all();
  }
  // The holder waits for something outside (its experts): the other pass may compute.
  void BeginWait() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      held_ = false;
      ++waiting_;
    }
    cv_.notify_all();
  }
  void EndWait() {
    std::unique_lock<std::mutex> lock(mu_);
    --waiting_;
    Take(lock);
  }
  uint64_t handoffs() const {
    std::lock_guard<std::mutex> lock(mu_);
    return handoffs_;
  }

 private:
  void Take(std::unique_lock<std::mutex>& lock) {
    cv_.wait(lock, [&] { return !held_; });
    held_ = true;
    if (waiting_ > 0) ++handoffs_;  // computing while the other pass waits: overlap
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool held_ = false;
  int waiting_ = 0;
  uint64_t handoffs_ = 0;
};

}  // namespace internal

namespace {
thread_local internal::Baton* current_baton = nullptr;
thread_local bool released = false;  // inside a ComputeReleased already (nesting does nothing)
}  // namespace

PingPong::PingPong() : baton_(std::make_unique<internal::Baton>()), helper_([this] { Helper(); }) {
  pthread_setname_np(helper_.native_handle(), "pingpong");
}

PingPong::~PingPong() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  helper_.join();
}

uint64_t PingPong::handoffs() const { return baton_->handoffs(); }

void PingPong::Run(absl::FunctionRef<void()> a, absl::FunctionRef<void()> b) {
  baton_->Acquire();  // `a` goes first: taken before `b` can ask
  {
    std::lock_guard<std::mutex> lock(mu_);
    task_ = &b;
    task_done_ = false;
  }
  cv_.notify_all();
  current_baton = baton_.get();
  a();
  current_baton = nullptr;
  baton_->Release();
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return task_done_; });
  task_ = nullptr;
}

void PingPong::Helper() {
  for (;;) {
    const absl::FunctionRef<void()>* task = nullptr;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || (task_ != nullptr && !task_done_); });
      if (stopping_) return;
      task = task_;
    }
    baton_->Acquire();
    current_baton = baton_.get();
    (*task)();
    current_baton = nullptr;
    baton_->Release();
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_done_ = true;
    }
    cv_.notify_all();
  }
}

ComputeReleased::ComputeReleased() : baton_(released ? nullptr : current_baton) {
  if (baton_ == nullptr) return;
  released = true;
  baton_->BeginWait();
}

ComputeReleased::~ComputeReleased() {
  if (baton_ == nullptr) return;
  baton_->EndWait();
  released = false;
}

ChunkWavefront::ChunkWavefront(int64_t rounds) : rounds_(static_cast<size_t>(rounds)) {}

absl::Status ChunkWavefront::AwaitLayer(int64_t round, int64_t layer) {
  if (round <= 0) return absl::OkStatus();
  std::unique_lock<std::mutex> lock(mu_);
  const Progress& before = rounds_[static_cast<size_t>(round - 1)];
  auto ready = [&] { return before.written >= layer || before.ended; };
  if (!ready()) {
    lock.unlock();
    {
      ComputeReleased away;  // the round before computes meanwhile
      std::unique_lock<std::mutex> wait(mu_);
      cv_.wait(wait, ready);
    }  // `wait` unlocks before `away` waits for the compute: its holder may be about to lock mu_
    lock.lock();
  }
  if (before.written >= layer) return absl::OkStatus();
  return absl::CancelledError(
      absl::StrCat("prefill chunk ", round - 1, " failed before writing layer ", layer));
}

void ChunkWavefront::LayerWritten(int64_t round, int64_t layer) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    Progress& p = rounds_[static_cast<size_t>(round)];
    p.written = std::max(p.written, layer);
  }
  cv_.notify_all();
}

void ChunkWavefront::RoundEnded(int64_t round) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    rounds_[static_cast<size_t>(round)].ended = true;
  }
  cv_.notify_all();
}

}  // namespace splitmoe::engine
