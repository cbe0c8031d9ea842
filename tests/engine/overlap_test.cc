// PingPong: two passes run one at a time, a pass that waits (ComputeReleased) lets the other
// compute, and the compute comes back in order; outside a pass ComputeReleased does nothing.
#include "common/engine/overlap.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace splitmoe::engine {
namespace {

class Log {
 public:
  void Add(std::string event) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
  }
  std::vector<std::string> events() {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> events_;
};

TEST(PingPongTest, AWaitingPassLetsTheOtherCompute) {
  PingPong overlap;
  Log log;
  std::mutex mu;
  std::condition_variable cv;
  int layers_done[2] = {0, 0};
  std::atomic<int> computing{0};
  std::atomic<bool> both{false};
  constexpr int kLayers = 3;
  // A pass of three "layers": compute (attention), then wait for the experts — here, for the
  // other pass to compute its next layer, which it can only do if the waiting pass let it.
  auto pass = [&](int me) {
    const int other = 1 - me;
    for (int layer = 0; layer < kLayers; ++layer) {
      if (computing.fetch_add(1) != 0) both = true;
      log.Add(std::string(me == 0 ? "a" : "b") + std::to_string(layer));
      computing.fetch_sub(1);
      {
        std::lock_guard<std::mutex> lock(mu);
        ++layers_done[me];
      }
      cv.notify_all();
      ComputeReleased away;
      std::unique_lock<std::mutex> lock(mu);
      // a waits for b's same layer, b for a's next one (or a's end).
      const int want = me == 0 ? layer + 1 : std::min(layer + 2, kLayers);
      ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10),
                              [&] { return layers_done[other] >= want; }))
          << "the other pass never computed while this one waited";
    }
  };
  overlap.Run([&] { pass(0); }, [&] { pass(1); });
  EXPECT_FALSE(both) << "both passes computed at once";
  EXPECT_EQ(log.events(), (std::vector<std::string>{"a0", "b0", "a1", "b1", "a2", "b2"}));
  EXPECT_GE(overlap.handoffs(), 3u);
}

TEST(PingPongTest, PassesThatNeverWaitSimplyRunInTurn) {
  PingPong overlap;
  std::vector<int> order;
  for (int round = 0; round < 20; ++round) {  // the helper thread is reused
    overlap.Run([&] { order.push_back(1); }, [&] { order.push_back(2); });
  }
  ASSERT_EQ(order.size(), 40u);
  for (size_t i = 0; i < order.size(); i += 2) {
    EXPECT_EQ(order[i], 1);
    EXPECT_EQ(order[i + 1], 2);
  }
  EXPECT_EQ(overlap.handoffs(), 0u);
}

TEST(PingPongTest, ANestedComputeReleasedDoesNothing) {
  PingPong overlap;
  std::atomic<int> computing{0};
  std::atomic<bool> both{false};
  auto pass = [&] {
    for (int i = 0; i < 50; ++i) {
      if (computing.fetch_add(1) != 0) both = true;
      computing.fetch_sub(1);
      ComputeReleased outer;
      ComputeReleased inner;  // must not hand out the baton a second time
      std::this_thread::yield();
    }
  };
  overlap.Run(pass, pass);
  EXPECT_FALSE(both);
}

TEST(PingPongTest, ComputeReleasedOutsideAPassDoesNothing) {
  ComputeReleased away;  // no baton: must not block or crash
  SUCCEED();
}

}  // namespace
}  // namespace splitmoe::engine
