#include "common/runtime/mailbox.h"

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace splitmoe::runtime {
namespace {

TEST(MailboxTest, FirstInFirstOut) {
  Mailbox<int> mailbox;
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(mailbox.Push(i));
  EXPECT_EQ(mailbox.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(mailbox.Pop(), i);
  EXPECT_EQ(mailbox.TryPop(), std::nullopt);
}

TEST(MailboxTest, TryPopOnEmptyReturnsAtOnce) {
  Mailbox<std::string> mailbox;
  EXPECT_EQ(mailbox.TryPop(), std::nullopt);
  EXPECT_TRUE(mailbox.Push(std::string("a")));
  EXPECT_EQ(mailbox.TryPop(), "a");
}

TEST(MailboxTest, PopForTimesOutWhenEmpty) {
  Mailbox<int> mailbox;
  const absl::Time start = absl::Now();
  EXPECT_EQ(mailbox.PopFor(absl::Milliseconds(20)), std::nullopt);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(19));
  EXPECT_FALSE(mailbox.drained());  // a timeout, not the end
}

TEST(MailboxTest, PushAfterCloseFailsAndLeavesTheItem) {
  Mailbox<std::unique_ptr<int>> mailbox;
  mailbox.Close();
  auto item = std::make_unique<int>(7);
  EXPECT_FALSE(mailbox.Push(std::move(item)));
  // NOLINTNEXTLINE(bugprone-use-after-move): a refused item stays with the caller.
  ASSERT_NE(item, nullptr);
  EXPECT_EQ(*item, 7);  // NOLINT(bugprone-use-after-move)
}

TEST(MailboxTest, CloseDrainsWhatWasQueuedThenEnds) {
  Mailbox<int> mailbox;
  EXPECT_TRUE(mailbox.Push(1));
  EXPECT_TRUE(mailbox.Push(2));
  mailbox.Close();
  EXPECT_TRUE(mailbox.closed());
  EXPECT_FALSE(mailbox.drained());
  EXPECT_EQ(mailbox.Pop(), 1);
  EXPECT_EQ(mailbox.PopFor(absl::Seconds(5)), 2);
  EXPECT_TRUE(mailbox.drained());
  EXPECT_EQ(mailbox.Pop(), std::nullopt);  // does not block
  EXPECT_EQ(mailbox.PopFor(absl::Seconds(5)), std::nullopt);
}

TEST(MailboxTest, BlockedPopWakesOnPushAndOnClose) {
  Mailbox<int> mailbox;
  std::optional<int> first;
  std::optional<int> second = 0;
  std::thread consumer([&] {
    first = mailbox.Pop();
    second = mailbox.Pop();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(mailbox.Push(42));
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  mailbox.Close();
  consumer.join();
  EXPECT_EQ(first, 42);
  EXPECT_EQ(second, std::nullopt);
}

// An idle spin changes when a consumer sleeps, never what it gets: a push, a close and an
// interrupt end the spin at once, and a timeout shorter than the spin is kept.
TEST(MailboxTest, IdleSpinHandsOutPushesAndKeepsTimeoutsCloseAndInterrupt) {
  Mailbox<int> mailbox;
  mailbox.SetIdleSpin(absl::Seconds(2));
  absl::Time start = absl::Now();
  EXPECT_EQ(mailbox.PopFor(absl::Milliseconds(20)), std::nullopt);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(19));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));  // the deadline, not the spin

  std::optional<int> got;
  std::thread consumer([&] { got = mailbox.Pop(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  start = absl::Now();
  EXPECT_TRUE(mailbox.Push(7));
  consumer.join();
  EXPECT_EQ(got, 7);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));

  std::thread interrupted([&] { got = mailbox.Pop(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  start = absl::Now();
  mailbox.Interrupt();
  interrupted.join();
  EXPECT_EQ(got, std::nullopt);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));

  std::thread closed([&] { got = mailbox.Pop(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  start = absl::Now();
  mailbox.Close();
  closed.join();
  EXPECT_EQ(got, std::nullopt);
  EXPECT_TRUE(mailbox.drained());
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST(MailboxTest, ManyProducersLoseNothingAndKeepTheirOrder) {
  constexpr int kProducers = 4;
  constexpr int kPerProducer = 5000;
  Mailbox<std::pair<int, int>> mailbox;  // (producer, sequence)
  std::vector<std::thread> producers;
  producers.reserve(kProducers);
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&mailbox, p] {
      for (int i = 0; i < kPerProducer; ++i) EXPECT_TRUE(mailbox.Push({p, i}));
    });
  }
  std::vector<int> next(kProducers, 0);
  int received = 0;
  while (received < kProducers * kPerProducer) {
    std::optional<std::pair<int, int>> item = mailbox.PopFor(absl::Seconds(10));
    ASSERT_TRUE(item.has_value()) << "after " << received;
    EXPECT_EQ(item->second, next[item->first]) << "producer " << item->first;
    next[item->first] = item->second + 1;
    ++received;
  }
  for (std::thread& t : producers) t.join();
  EXPECT_EQ(mailbox.TryPop(), std::nullopt);
}

}  // namespace
}  // namespace splitmoe::runtime
