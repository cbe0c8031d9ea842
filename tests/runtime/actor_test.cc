// Actors on their own threads: ordering, many senders, replies, stopping, refs, timers, two
// actors talking. Every wait is bounded, so a broken runtime fails instead of hanging.
#include "common/runtime/actor.h"

#include <atomic>
#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace splitmoe::runtime {
namespace {

using ::testing::HasSubstr;

// Collects one answer; Wait() gives up after a few seconds.
template <typename T>
class Answer {
 public:
  Reply<T> reply() {
    return
        [promise = promise_](absl::StatusOr<T> result) { promise->set_value(std::move(result)); };
  }
  absl::StatusOr<T> Wait() {
    if (future_.wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
      return absl::DeadlineExceededError("no answer within 5 s");
    }
    return future_.get();
  }
  bool answered() const {
    return future_.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  }

 private:
  std::shared_ptr<std::promise<absl::StatusOr<T>>> promise_ =
      std::make_shared<std::promise<absl::StatusOr<T>>>();
  std::future<absl::StatusOr<T>> future_ = promise_->get_future();
};

// --- A counter that also checks per-sender order.

struct Add {
  int sender = 0;
  int sequence = 0;
  int amount = 1;
};
struct Totals {
  int64_t total = 0;
  int64_t messages = 0;
  int64_t out_of_order = 0;
};
struct GetTotals {
  Reply<Totals> reply;
};
// Parks the request until the total reaches `at_least` (a request answered later, from state).
struct WaitForTotal {
  int64_t at_least = 0;
  Reply<int64_t> reply;
};
// Handler that forgets to answer (a bug the runtime reports).
struct Forget {
  Reply<int> reply;
};
// Blocks the actor's thread until released: only for tests that need a queue to build up.
struct Block {
  std::shared_future<void> release;
};

class Counter {
 public:
  using Message = std::variant<Add, GetTotals, WaitForTotal, Forget, Block>;

  void Handle(Add add) {
    ++totals_.messages;
    totals_.total += add.amount;
    auto [it, inserted] = next_.emplace(add.sender, 0);
    if (add.sequence != it->second) ++totals_.out_of_order;
    it->second = add.sequence + 1;
    for (auto w = waiting_.begin(); w != waiting_.end();) {
      if (totals_.total >= w->at_least) {
        w->reply(totals_.total);
        w = waiting_.erase(w);
      } else {
        ++w;
      }
    }
  }
  void Handle(GetTotals get) { get.reply(totals_); }
  void Handle(WaitForTotal wait) { waiting_.push_back(std::move(wait)); }
  void Handle(Forget) {}
  void Handle(const Block& block) { block.release.wait(); }

 private:
  Totals totals_;
  std::map<int, int> next_;  // sender -> expected sequence
  std::vector<WaitForTotal> waiting_;
};

absl::StatusOr<Totals> TotalsOf(const ActorRef<Counter::Message>& counter) {
  Answer<Totals> answer;
  counter.Send(GetTotals{answer.reply()});
  return answer.Wait();
}

TEST(ActorTest, HandlesOneSendersMessagesInOrder) {
  Actor<Counter> counter("counter", std::make_unique<Counter>());
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(counter.Send(Add{0, i}));
  absl::StatusOr<Totals> totals = TotalsOf(counter.ref());
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(totals->messages, 1000);
  EXPECT_EQ(totals->out_of_order, 0);
}

TEST(ActorTest, ManySendersOnManyThreadsLoseNothing) {
  constexpr int kSenders = 8;
  constexpr int kPerSender = 2000;
  Actor<Counter> counter("counter", std::make_unique<Counter>());
  std::vector<std::thread> senders;
  senders.reserve(kSenders);
  std::atomic<int> accepted{0};
  for (int s = 0; s < kSenders; ++s) {
    senders.emplace_back([ref = counter.ref(), s, &accepted] {  // each sender its own ref copy
      for (int i = 0; i < kPerSender; ++i) {
        if (ref.Send(Add{s, i, 2})) accepted.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (std::thread& t : senders) t.join();
  absl::StatusOr<Totals> totals = TotalsOf(counter.ref());
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(accepted.load(), kSenders * kPerSender);
  EXPECT_EQ(totals->messages, kSenders * kPerSender);
  EXPECT_EQ(totals->total, 2LL * kSenders * kPerSender);
  EXPECT_EQ(totals->out_of_order, 0);
}

// An actor that polls its mailbox before sleeping (SetIdleSpin) loses and reorders nothing,
// and stops like any other.
TEST(ActorTest, AnIdleSpinningActorLosesNothingAndStops) {
  constexpr int kSenders = 4;
  constexpr int kPerSender = 1000;
  Actor<Counter> counter("counter", std::make_unique<Counter>());
  counter.SetIdleSpin(absl::Milliseconds(5));
  std::vector<std::thread> senders;
  for (int s = 0; s < kSenders; ++s) {
    senders.emplace_back([ref = counter.ref(), s] {
      for (int i = 0; i < kPerSender; ++i) {
        ref.Send(Add{s, i, 1});
        if (i % 100 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  }
  for (std::thread& t : senders) t.join();
  absl::StatusOr<Totals> totals = TotalsOf(counter.ref());
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(totals->messages, kSenders * kPerSender);
  EXPECT_EQ(totals->out_of_order, 0);
  const absl::Time start = absl::Now();
  counter.Stop();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST(ActorTest, RequestReply) {
  Actor<Counter> counter("counter", std::make_unique<Counter>());
  counter.Send(Add{0, 0, 5});
  counter.Send(Add{0, 1, 7});
  absl::StatusOr<Totals> totals = TotalsOf(counter.ref());
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(totals->total, 12);

  Answer<int64_t> parked;
  counter.Send(WaitForTotal{20, parked.reply()});
  EXPECT_TRUE(TotalsOf(counter.ref()).ok());
  EXPECT_FALSE(parked.answered());  // still parked in the state
  counter.Send(Add{0, 2, 8});
  absl::StatusOr<int64_t> reached = parked.Wait();
  ASSERT_TRUE(reached.ok()) << reached.status();
  EXPECT_EQ(*reached, 20);
}

TEST(ActorTest, ReplyDroppedByAHandlerIsAnsweredWithInternal) {
  Actor<Counter> counter("counter", std::make_unique<Counter>());
  Answer<int> answer;
  counter.Send(Forget{answer.reply()});
  absl::StatusOr<int> result = answer.Wait();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(result.status().message(), HasSubstr("actor counter dropped a request"));
}

TEST(ActorTest, StopHandlesWhatWasQueuedBeforeIt) {
  auto counter = std::make_unique<Actor<Counter>>("counter", std::make_unique<Counter>());
  std::promise<void> release;
  counter->Send(Block{release.get_future().share()});
  for (int i = 0; i < 100; ++i) counter->Send(Add{0, i});
  Answer<Totals> queued_ask;
  counter->Send(GetTotals{queued_ask.reply()});

  std::thread stopper([&counter] { counter->Stop(); });
  // Once Stop() has closed the mailbox, sends fail; the actor is still blocked in Block.
  const absl::Time give_up = absl::Now() + absl::Seconds(5);
  while (counter->Send(Add{1, 0, 0}) && absl::Now() < give_up)
    absl::SleepFor(absl::Milliseconds(1));
  release.set_value();
  stopper.join();

  absl::StatusOr<Totals> totals = queued_ask.Wait();
  ASSERT_TRUE(totals.ok()) << totals.status();  // handled, not failed
  EXPECT_EQ(totals->total, 100);
  EXPECT_EQ(totals->out_of_order, 0);
}

TEST(ActorTest, RepliesOfDroppedMessagesFailWithUnavailable) {
  auto counter = std::make_unique<Actor<Counter>>("counter", std::make_unique<Counter>());
  Answer<int64_t> parked;   // in the state when the actor is destroyed
  Answer<Totals> on_timer;  // in a timer when the actor stops
  Answer<Totals> too_late;  // sent after Stop
  counter->Send(WaitForTotal{1000, parked.reply()});
  counter->ScheduleAfter(absl::Hours(1), GetTotals{on_timer.reply()});
  EXPECT_TRUE(TotalsOf(counter->ref()).ok());  // WaitForTotal is parked by now

  counter->Stop();
  EXPECT_FALSE(counter->Send(GetTotals{too_late.reply()}));
  EXPECT_FALSE(counter->ScheduleAfter(absl::Seconds(1), Add{}).valid());
  for (Answer<Totals>* answer : {&on_timer, &too_late}) {
    absl::StatusOr<Totals> result = answer->Wait();
    EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(result.status().message(), "actor counter stopped");
  }
  EXPECT_FALSE(parked.answered());  // the state still exists after Stop()
  counter.reset();
  absl::StatusOr<int64_t> result = parked.Wait();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(result.status().message(), "actor counter stopped");
}

TEST(ActorTest, RefOutlivesTheActor) {
  ActorRef<Counter::Message> ref;
  {
    Actor<Counter> counter("short-lived", std::make_unique<Counter>());
    ref = counter.ref();
    EXPECT_TRUE(ref.Send(Add{}));
  }
  ActorRef<Counter::Message> copy = ref;
  EXPECT_EQ(copy, ref);
  EXPECT_EQ(copy.name(), "short-lived");
  Answer<Totals> answer;
  EXPECT_FALSE(copy.Send(GetTotals{answer.reply()}));
  absl::StatusOr<Totals> result = answer.Wait();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(result.status().message(), "actor short-lived stopped");

  ActorRef<Counter::Message> empty;
  EXPECT_FALSE(empty);
  Answer<Totals> nowhere;
  EXPECT_FALSE(empty.Send(GetTotals{nowhere.reply()}));
  EXPECT_EQ(nowhere.Wait().status().code(), absl::StatusCode::kFailedPrecondition);
}

// --- Timers.

struct Fire {
  int id = 0;
};
struct StartTicking {
  absl::Duration period;
  int ticks = 0;
  Reply<std::vector<int>> done;  // answered with the order of everything that fired
};
struct Tick {};
struct CancelPending {
  Reply<bool> reply;
};

class TimerUser {
 public:
  using Message = std::variant<Fire, StartTicking, Tick, CancelPending>;
  explicit TimerUser(std::shared_ptr<std::atomic<int>> fired) : fired_(std::move(fired)) {}

  void Handle(Fire fire, Context<Message>& ctx) {
    fired_->fetch_add(1);
    order_.push_back(fire.id);
    if (fire.id == 0) pending_ = ctx.ScheduleAfter(absl::Seconds(1), Fire{99});
  }
  void Handle(StartTicking start, Context<Message>& ctx) {
    ticks_left_ = start.ticks;
    period_ = start.period;
    done_ = std::move(start.done);
    ctx.ScheduleAfter(period_, Tick{});
  }
  void Handle(Tick, Context<Message>& ctx) {
    order_.push_back(-1);
    if (--ticks_left_ > 0) {
      ctx.ScheduleAfter(period_, Tick{});
    } else {
      done_(order_);
    }
  }
  void Handle(CancelPending cancel, Context<Message>& ctx) {
    cancel.reply(ctx.CancelTimer(pending_));
  }

 private:
  std::shared_ptr<std::atomic<int>> fired_;
  std::vector<int> order_;
  TimerId pending_;
  int ticks_left_ = 0;
  absl::Duration period_;
  Reply<std::vector<int>> done_;
};

TEST(ActorTest, TimersFireInDeadlineOrder) {
  auto fired = std::make_shared<std::atomic<int>>(0);
  Actor<TimerUser> actor("timers", std::make_unique<TimerUser>(fired));
  const absl::Time start = absl::Now();
  actor.ScheduleAfter(absl::Milliseconds(30), Fire{3});
  actor.ScheduleAfter(absl::Milliseconds(10), Fire{1});
  actor.ScheduleAfter(absl::Milliseconds(20), Fire{2});
  Answer<std::vector<int>> done;
  actor.Send(StartTicking{absl::Milliseconds(150), 1, done.reply()});  // ticks once at ~150 ms
  absl::StatusOr<std::vector<int>> order = done.Wait();
  ASSERT_TRUE(order.ok()) << order.status();
  EXPECT_EQ(*order, (std::vector<int>{1, 2, 3, -1}));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(150));
}

TEST(ActorTest, PeriodicTimerFromAHandler) {
  auto fired = std::make_shared<std::atomic<int>>(0);
  Actor<TimerUser> actor("ticker", std::make_unique<TimerUser>(fired));
  Answer<std::vector<int>> done;
  actor.Send(StartTicking{absl::Milliseconds(2), 10, done.reply()});
  absl::StatusOr<std::vector<int>> order = done.Wait();
  ASSERT_TRUE(order.ok()) << order.status();
  EXPECT_EQ(order->size(), 10u);
}

TEST(ActorTest, CancelledTimerDoesNotFire) {
  auto fired = std::make_shared<std::atomic<int>>(0);
  Actor<TimerUser> actor("timers", std::make_unique<TimerUser>(fired));
  TimerId from_outside = actor.ScheduleAfter(absl::Milliseconds(30), Fire{5});
  EXPECT_TRUE(actor.CancelTimer(from_outside));
  EXPECT_FALSE(actor.CancelTimer(from_outside));  // already gone
  actor.Send(Fire{0});                            // schedules Fire{99} in 1 s from its handler
  Answer<bool> cancelled;
  actor.Send(CancelPending{cancelled.reply()});
  absl::StatusOr<bool> result = cancelled.Wait();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(*result);
  absl::SleepFor(absl::Milliseconds(60));
  EXPECT_EQ(fired->load(), 1);  // only Fire{0}
}

TEST(ActorTest, StopCancelsTimers) {
  auto fired = std::make_shared<std::atomic<int>>(0);
  auto actor = std::make_unique<Actor<TimerUser>>("timers", std::make_unique<TimerUser>(fired));
  actor->ScheduleAfter(absl::Milliseconds(100), Fire{1});
  actor->ScheduleAfter(absl::ZeroDuration(), Fire{2});  // due at once: fires before Stop
  const absl::Time give_up = absl::Now() + absl::Seconds(5);
  while (fired->load() == 0 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  actor->Stop();
  absl::SleepFor(absl::Milliseconds(150));  // past Fire{1}'s deadline
  EXPECT_EQ(fired->load(), 1);
  actor.reset();
  EXPECT_EQ(fired->load(), 1);
}

// --- Two actors: ping-pong, and an ask from one actor to another.

struct Ping {
  int n = 0;
};
struct Pong {
  int n = 0;
};
struct PingerStart;
struct CounterTotal {
  absl::StatusOr<Totals> totals;
};

class Ponger {
 public:
  struct Serve {
    Ping ping;
    ActorRef<std::variant<Pong, CounterTotal, PingerStart>> reply_to;
  };
  using Message = std::variant<Serve>;
  void Handle(const Serve& serve);
};

struct PingerStart {
  int rounds = 0;
  ActorRef<Ponger::Message> ponger;
  ActorRef<Counter::Message> counter;
  Reply<std::vector<int>> done;
};

void Ponger::Handle(const Serve& serve) { serve.reply_to.Send(Pong{serve.ping.n}); }

class Pinger {
 public:
  using Message = std::variant<Pong, CounterTotal, PingerStart>;

  void Handle(PingerStart start, Context<Message>& ctx) {
    start_ = std::move(start);
    start_.ponger.Send(Ponger::Serve{Ping{0}, ctx.self()});
  }
  void Handle(Pong pong, Context<Message>& ctx) {
    seen_.push_back(pong.n);
    if (pong.n + 1 < start_.rounds) {
      start_.ponger.Send(Ponger::Serve{Ping{pong.n + 1}, ctx.self()});
      return;
    }
    // Ask the counter; its reply comes back to this actor as a message, never as a blocking wait.
    start_.counter.Send(GetTotals{[self = ctx.self()](absl::StatusOr<Totals> totals) {
      self.Send(CounterTotal{std::move(totals)});
    }});
  }
  void Handle(CounterTotal total) {
    if (!total.totals.ok()) {
      start_.done(total.totals.status());
      return;
    }
    seen_.push_back(static_cast<int>(total.totals->total));
    start_.done(std::move(seen_));
  }

 private:
  PingerStart start_;
  std::vector<int> seen_;
};

TEST(ActorTest, PingPongBetweenTwoActors) {
  constexpr int kRounds = 500;
  Actor<Counter> counter("counter", std::make_unique<Counter>());
  counter.Send(Add{0, 0, 1234});
  Actor<Ponger> ponger("ponger", std::make_unique<Ponger>());
  Actor<Pinger> pinger("pinger", std::make_unique<Pinger>());
  Answer<std::vector<int>> done;
  pinger.Send(PingerStart{kRounds, ponger.ref(), counter.ref(), done.reply()});
  absl::StatusOr<std::vector<int>> seen = done.Wait();
  ASSERT_TRUE(seen.ok()) << seen.status();
  ASSERT_EQ(seen->size(), kRounds + 1u);
  for (int i = 0; i < kRounds; ++i) EXPECT_EQ((*seen)[i], i);
  EXPECT_EQ(seen->back(), 1234);
}

TEST(ActorTest, AskToAStoppedActorComesBackAsAMessage) {
  auto counter = std::make_unique<Actor<Counter>>("counter", std::make_unique<Counter>());
  ActorRef<Counter::Message> counter_ref = counter->ref();
  counter.reset();
  Actor<Ponger> ponger("ponger", std::make_unique<Ponger>());
  Actor<Pinger> pinger("pinger", std::make_unique<Pinger>());
  Answer<std::vector<int>> done;
  pinger.Send(PingerStart{1, ponger.ref(), counter_ref, done.reply()});
  absl::StatusOr<std::vector<int>> seen = done.Wait();
  EXPECT_EQ(seen.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(seen.status().message(), "actor counter stopped");
}

}  // namespace
}  // namespace splitmoe::runtime
