// Actors under a ManualScheduler: no threads, messages stepped one at a time in the order they
// were sent, timers on a virtual clock. The tests assert exact sequences.
#include "common/runtime/manual_scheduler.h"

#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/runtime/actor.h"
#include "gtest/gtest.h"

namespace splitmoe::runtime {
namespace {

using Log = std::vector<std::string>;

// Records every message it handles into a log shared by the test (one thread: no locks).
struct Say;
struct Forward;
struct Heartbeat;
struct Ask;
using RecorderMessage = std::variant<Say, Forward, Heartbeat, Ask>;

struct Say {
  std::string word;
};
struct Forward {
  std::string word;
  ActorRef<RecorderMessage> to;
};
struct Heartbeat {};
struct Ask {
  Reply<std::string> reply;
};

class Recorder {
 public:
  using Message = RecorderMessage;
  Recorder(std::string name, Log* log, absl::Duration heartbeat = absl::ZeroDuration())
      : name_(std::move(name)), log_(log), heartbeat_(heartbeat) {}

  void Handle(const Say& say) { log_->push_back(absl::StrCat(name_, ":", say.word)); }
  void Handle(const Forward& forward) {
    log_->push_back(absl::StrCat(name_, ">", forward.word));
    forward.to.Send(Say{forward.word});
  }
  void Handle(Heartbeat, Context<Message>& ctx) {
    const absl::Duration since_start = absl::FromChrono(ctx.Now() - TimePoint());
    log_->push_back(absl::StrCat(name_, ":beat@", absl::ToInt64Milliseconds(since_start)));
    if (heartbeat_ > absl::ZeroDuration()) ctx.ScheduleAfter(heartbeat_, Heartbeat{});
  }
  void Handle(Ask ask) { ask.reply(name_); }

 private:
  std::string name_;
  Log* log_;
  absl::Duration heartbeat_;
};

std::unique_ptr<Recorder> MakeRecorder(const std::string& name, Log* log,
                                       absl::Duration heartbeat = absl::ZeroDuration()) {
  return std::make_unique<Recorder>(name, log, heartbeat);
}

TEST(ManualSchedulerTest, StepsMessagesInTheOrderTheyWereSent) {
  ManualScheduler scheduler;
  Log log;
  Actor<Recorder> a("a", MakeRecorder("a", &log), &scheduler);
  Actor<Recorder> b("b", MakeRecorder("b", &log), &scheduler);
  EXPECT_FALSE(scheduler.Step());

  a.Send(Say{"1"});
  b.Send(Say{"2"});
  a.Send(Forward{"3", b.ref()});  // a handles it, then b gets Say{3} last
  b.Send(Say{"4"});
  EXPECT_EQ(scheduler.queued(), 4u);
  EXPECT_TRUE(log.empty());  // nothing runs by itself

  EXPECT_TRUE(scheduler.Step());
  EXPECT_EQ(log, (Log{"a:1"}));
  EXPECT_TRUE(scheduler.Step());
  EXPECT_TRUE(scheduler.Step());
  EXPECT_EQ(log, (Log{"a:1", "b:2", "a>3"}));
  EXPECT_EQ(scheduler.RunUntilIdle(), 2u);
  EXPECT_EQ(log, (Log{"a:1", "b:2", "a>3", "b:4", "b:3"}));
  EXPECT_FALSE(scheduler.Step());
}

// Ping-pong: each handler forwards to the other; the sequence is exact, run after run.
struct Ball {
  int hits = 0;
};
class Player {
 public:
  using Message = std::variant<Ball>;
  Player(std::string name, Log* log, int last_hit)
      : name_(std::move(name)), log_(log), last_hit_(last_hit) {}
  void set_peer(ActorRef<Message> peer) { peer_ = std::move(peer); }
  void Handle(Ball ball) {
    log_->push_back(absl::StrCat(name_, ball.hits));
    if (ball.hits < last_hit_) peer_.Send(Ball{ball.hits + 1});
  }

 private:
  std::string name_;
  Log* log_;
  int last_hit_;
  ActorRef<Message> peer_;
};

TEST(ManualSchedulerTest, PingPongIsDeterministic) {
  for (int run = 0; run < 3; ++run) {
    ManualScheduler scheduler;
    Log log;
    auto ping_state = std::make_unique<Player>("ping", &log, 5);
    auto pong_state = std::make_unique<Player>("pong", &log, 5);
    Player* ping_raw = ping_state.get();
    Player* pong_raw = pong_state.get();
    Actor<Player> ping("ping", std::move(ping_state), &scheduler);
    Actor<Player> pong("pong", std::move(pong_state), &scheduler);
    // Wiring before the first message: nothing runs until the test steps, so this is no race.
    ping_raw->set_peer(pong.ref());
    pong_raw->set_peer(ping.ref());

    ping.Send(Ball{0});
    EXPECT_TRUE(scheduler.Step());
    EXPECT_EQ(log, (Log{"ping0"}));
    EXPECT_EQ(scheduler.queued(), 1u);
    EXPECT_EQ(scheduler.RunUntilIdle(), 5u);
    EXPECT_EQ(log, (Log{"ping0", "pong1", "ping2", "pong3", "ping4", "pong5"})) << "run " << run;
  }
}

TEST(ManualSchedulerTest, TimersRunOnTheVirtualClock) {
  ManualScheduler scheduler;
  Log log;
  Actor<Recorder> a("a", MakeRecorder("a", &log, absl::Milliseconds(100)), &scheduler);
  Actor<Recorder> b("b", MakeRecorder("b", &log), &scheduler);
  a.ScheduleAfter(absl::Milliseconds(100), Heartbeat{});
  b.ScheduleAfter(absl::Milliseconds(250), Say{"once"});
  b.ScheduleAfter(absl::ZeroDuration(), Say{"now"});

  EXPECT_EQ(scheduler.RunUntilIdle(), 1u);  // only what is due at t=0
  EXPECT_EQ(log, (Log{"b:now"}));
  EXPECT_EQ(scheduler.AdvanceBy(absl::Milliseconds(99)), 0u);
  EXPECT_EQ(scheduler.AdvanceBy(absl::Milliseconds(301)), 5u);  // to t=400 ms
  EXPECT_EQ(log, (Log{"b:now", "a:beat@100", "a:beat@200", "b:once", "a:beat@300", "a:beat@400"}));
  EXPECT_EQ(scheduler.Now() - TimePoint(), std::chrono::milliseconds(400));
}

TEST(ManualSchedulerTest, CancelledTimerDoesNotFire) {
  ManualScheduler scheduler;
  Log log;
  Actor<Recorder> a("a", MakeRecorder("a", &log), &scheduler);
  TimerId keep = a.ScheduleAfter(absl::Seconds(1), Say{"kept"});
  TimerId cancel = a.ScheduleAfter(absl::Seconds(1), Say{"cancelled"});
  EXPECT_TRUE(keep.valid());
  EXPECT_TRUE(a.CancelTimer(cancel));
  scheduler.AdvanceBy(absl::Seconds(2));
  EXPECT_EQ(log, (Log{"a:kept"}));
  EXPECT_FALSE(a.CancelTimer(keep));  // fired already
}

TEST(ManualSchedulerTest, StopDrainsQueueAndFailsTimers) {
  ManualScheduler scheduler;
  Log log;
  auto a = std::make_unique<Actor<Recorder>>("a", MakeRecorder("a", &log), &scheduler);
  absl::StatusOr<std::string> on_timer;
  absl::StatusOr<std::string> queued;
  a->ScheduleAfter(absl::Seconds(1),
                   Ask{[&](absl::StatusOr<std::string> r) { on_timer = std::move(r); }});
  a->Send(Say{"x"});
  a->Send(Ask{[&](absl::StatusOr<std::string> r) { queued = std::move(r); }});
  a->Stop();  // runs the two queued messages right here
  EXPECT_EQ(log, (Log{"a:x"}));
  ASSERT_TRUE(queued.ok()) << queued.status();
  EXPECT_EQ(*queued, "a");
  EXPECT_EQ(on_timer.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(on_timer.status().message(), "actor a stopped");

  ActorRef<Recorder::Message> ref = a->ref();
  a.reset();
  EXPECT_FALSE(ref.Send(Say{"late"}));
  EXPECT_EQ(scheduler.RunUntilIdle(), 0u);  // stale queue entries are skipped
  scheduler.AdvanceBy(absl::Seconds(5));
  EXPECT_EQ(log, (Log{"a:x"}));
}

TEST(ManualSchedulerTest, AskBetweenActorsIsStepped) {
  ManualScheduler scheduler;
  Log log;
  Actor<Recorder> a("a", MakeRecorder("a", &log), &scheduler);
  Actor<Recorder> b("b", MakeRecorder("b", &log), &scheduler);
  // b asks a; the answer comes back to b as a message, one step later.
  a.Send(Ask{[b_ref = b.ref()](const absl::StatusOr<std::string>& name) {
    b_ref.Send(Say{absl::StrCat("answer-from-", name.value_or("?"))});
  }});
  EXPECT_TRUE(scheduler.Step());
  EXPECT_TRUE(log.empty());
  EXPECT_TRUE(scheduler.Step());
  EXPECT_EQ(log, (Log{"b:answer-from-a"}));
}

// A State whose Message is one struct rather than a variant.
struct Note {
  int value = 0;
};
class Summer {
 public:
  using Message = Note;
  explicit Summer(int* sum) : sum_(sum) {}
  void Handle(Note note) { *sum_ += note.value; }

 private:
  int* sum_;
};

TEST(ManualSchedulerTest, SingleMessageTypeNeedsNoVariant) {
  ManualScheduler scheduler;
  int sum = 0;
  Actor<Summer> summer("summer", std::make_unique<Summer>(&sum), &scheduler);
  summer.Send(Note{2});
  summer.Send(Note{3});
  EXPECT_EQ(scheduler.RunUntilIdle(), 2u);
  EXPECT_EQ(sum, 5);
}

TEST(ManualSchedulerTest, SchedulerMayGoFirst) {
  Log log;
  auto scheduler = std::make_unique<ManualScheduler>();
  Actor<Recorder> a("a", MakeRecorder("a", &log), scheduler.get());
  a.Send(Say{"never"});
  scheduler.reset();
  ActorRef<Recorder::Message> ref = a.ref();
  EXPECT_TRUE(ref.Send(Say{"queued"}));  // the actor still accepts until stopped
  a.Stop();                              // and drains on Stop
  EXPECT_EQ(log, (Log{"a:never", "a:queued"}));
  EXPECT_FALSE(ref.Send(Say{"late"}));
}

}  // namespace
}  // namespace splitmoe::runtime
