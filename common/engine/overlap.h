// Micro-batch overlap, the ping-pong of MegaScale-Infer: two forward passes (two micro-batches
// of a decode step, two groups of prompts of a prefill batch) run on two threads, but only one
// of them computes at a time. A pass gives the compute away while it waits for its remote
// experts (a ComputeReleased scope around the wait), so the other pass's attention runs during
// the first one's expert round trip, and the attention worker is never idle while a micro-batch
// is out at the experts. With local experts nothing waits and the passes simply alternate.
//
// Because only one pass computes at a time — a pass holds the compute from its start to its
// first wait, and from each wake to its next wait or its end — the two passes never race on
// what they share (the transformer's weights, the latent cache's bookkeeping, a hook that ships
// latents); only code inside a ComputeReleased scope runs beside the other pass, and it must be
// thread-safe (the MoE executor's wait is).
//
//   PingPong overlap;                                     // one helper thread, reused
//   overlap.Run([&] { a = model.Forward(half_a, ...); },  // on this thread
//               [&] { b = model.Forward(half_b, ...); }); // on the helper; returns when both end
//
//   // in a MoE executor, around its wait for the answers:
//   { ComputeReleased away; cv.wait(lock, ...); }
#ifndef SPLITMOE_COMMON_ENGINE_OVERLAP_H_
#define SPLITMOE_COMMON_ENGINE_OVERLAP_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"

namespace splitmoe::engine {
namespace internal {
class Baton;
}  // namespace internal

class PingPong {
 public:
  PingPong();
  ~PingPong();
  PingPong(const PingPong&) = delete;
  PingPong& operator=(const PingPong&) = delete;

  // Runs `a` on the calling thread and `b` on the helper thread, `a` first, one computing at a
  // time; returns when both have returned. One Run at a time.
  void Run(absl::FunctionRef<void()> a, absl::FunctionRef<void()> b);

  // Times a pass took the compute while the other waited for its experts: the overlap that
  // actually happened (benchmarks and tests).
  uint64_t handoffs() const;

 private:
  void Helper();

  std::unique_ptr<internal::Baton> baton_;
  std::mutex mu_;
  std::condition_variable cv_;
  const absl::FunctionRef<void()>* task_ = nullptr;  // guarded by mu_: b of the current Run
  bool task_done_ = false;                           // guarded by mu_
  bool stopping_ = false;                            // guarded by mu_
  std::thread helper_;  // last: starts once the rest exists
};

// Inside a PingPong pass: lets the other pass compute until the scope ends, then waits for the
// compute back. Outside a pass, or nested in another ComputeReleased, it does nothing, so code
// may use it unconditionally.
class ComputeReleased {
 public:
  ComputeReleased();
  ~ComputeReleased();
  ComputeReleased(const ComputeReleased&) = delete;
  ComputeReleased& operator=(const ComputeReleased&) = delete;

 private:
  internal::Baton* baton_;  // the pass's, or null outside a pass
};

// The wavefront of pipelined chunks (prefill of long prompts): the rounds of a prefill — chunk
// 0, 1, 2, ... of the same prompts — run as two passes in ping-pong (even rounds on one, odd on
// the other), and round r may run its attention at layer l once round r - 1 has written its
// latents of layer l there. So chunk r's attention at layer l runs while chunk r - 1's experts
// of layer l are out: a chunk's MoE overlaps the next chunk's attention. Waiting gives the
// compute away (ComputeReleased). Thread-safe.
//
//   ChunkWavefront wave(rounds);
//   LayerOrder order{[&](int64_t l) { return wave.AwaitLayer(r, l); },
//                    [&](int64_t l) { wave.LayerWritten(r, l); }};
//   absl::Status s = model.Forward(chunk_r, form, &hidden, nullptr, &order);
//   wave.RoundEnded(r);
class ChunkWavefront {
 public:
  explicit ChunkWavefront(int64_t rounds);
  // Before round `round`'s attention at `layer`: OK once round - 1 has written that layer (at
  // once for round 0); Cancelled when round - 1 ended without writing it (it failed).
  absl::Status AwaitLayer(int64_t round, int64_t layer);
  // Round `round` has written its latents of `layer` (layers are written in ascending order).
  void LayerWritten(int64_t round, int64_t layer);
  // Round `round` is over (every layer written, or failed): nobody waits for it any more.
  void RoundEnded(int64_t round);

 private:
  struct Progress {
    int64_t written = -1;  // highest layer written
    bool ended = false;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Progress> rounds_;  // guarded by mu_
};

}  // namespace splitmoe::engine

#endif  // SPLITMOE_COMMON_ENGINE_OVERLAP_H_
