#include "common/runtime/executor.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace splitmoe::runtime {
namespace {

TEST(ThreadExecutorTest, RunsTasksInOrderOffTheCallersThread) {
  std::vector<int> order;
  std::atomic<bool> other_thread{true};
  const std::thread::id caller = std::this_thread::get_id();
  absl::Notification done;
  {
    ThreadExecutor executor("test");
    for (int i = 0; i < 100; ++i) {
      executor.Run([&, i] {
        order.push_back(i);
        if (std::this_thread::get_id() == caller) other_thread = false;
      });
    }
    executor.Run([&] { done.Notify(); });
    done.WaitForNotification();
  }
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
  EXPECT_TRUE(other_thread);
}

TEST(ThreadExecutorTest, DestructionRunsWhatIsQueued) {
  std::atomic<int> ran{0};
  {
    ThreadExecutor executor("test");
    absl::Notification gate;
    executor.Run([&] { gate.WaitForNotification(); });
    for (int i = 0; i < 10; ++i) executor.Run([&] { ++ran; });
    gate.Notify();
  }  // joins after the queue is empty
  EXPECT_EQ(ran.load(), 10);
}

TEST(ManualExecutorTest, RunsOnlyWhenTold) {
  ManualExecutor executor;
  int ran = 0;
  executor.Run([&] {
    ++ran;
    executor.Run([&] { ran += 10; });  // queued by a task: RunAll runs it too
  });
  EXPECT_EQ(ran, 0);
  EXPECT_EQ(executor.queued(), 1u);
  EXPECT_TRUE(executor.RunOne());
  EXPECT_EQ(ran, 1);
  EXPECT_EQ(executor.RunAll(), 1u);
  EXPECT_EQ(ran, 11);
  EXPECT_FALSE(executor.RunOne());
}

}  // namespace
}  // namespace splitmoe::runtime
