// Actors: how every process role owns its state. An actor is a State object plus its handlers;
// the runtime gives it a mailbox and one thread of its own, and calls one handler at a time on
// that thread, so the state needs no locks. Nothing else ever touches the state: other threads
// (gRPC handlers, the UCX progress thread, other actors) hold an ActorRef that can only send, and
// get answers through a Reply<T> carried in the message (see reply.h).
//
// The State class names its message type (usually a std::variant of plain structs named as
// commands or events) and has one Handle overload per alternative, taking it by value, with or
// without a Context for self-sends, timers and the clock. A missing overload is a compile error.
// Handlers must not block: wait for something by sending a request whose reply sends a message
// back.
//
//   struct Add { int n = 0; };
//   struct Get { Reply<int> reply; };
//   struct Tick {};
//   class Counter {
//    public:
//     using Message = std::variant<Add, Get, Tick>;
//     void Handle(Add add) { total_ += add.n; }
//     void Handle(Get get) { get.reply(total_); }
//     void Handle(Tick, Context<Message>& ctx) { ctx.ScheduleAfter(absl::Seconds(1), Tick{}); }
//    private:
//     int total_ = 0;
//   };
//
//   Actor<Counter> counter("counter", std::make_unique<Counter>());  // its thread starts here
//   ActorRef<Counter::Message> ref = counter.ref();                   // copy it anywhere
//   ref.Send(Add{2});
//   ref.Send(Get{[](absl::StatusOr<int> total) { ... }});
//   counter.ScheduleAfter(absl::Seconds(1), Tick{});
//   counter.Stop();  // or let it go out of scope
//
// Lifetime: Send on an ActorRef is safe from any thread at any time, also after the actor is
// gone (it then returns false). Stop() is draining: the actor accepts nothing more, handles what
// was already queued, cancels its timers and joins its thread; the destructor calls it and then
// destroys the state. Every Reply of a message the actor never handles (sent after Stop, a timer
// cancelled by Stop, a request still parked in the state when it is destroyed) is answered with
// UnavailableError("actor <name> stopped"). Construct, Stop and destroy an Actor from threads other
// than its own; Stop() from one of its own handlers only closes the mailbox.
//
// Tests pass a ManualScheduler: the actor then has no thread, and the test steps its messages
// and moves its clock (manual_scheduler.h).
#ifndef SPLITMOE_COMMON_RUNTIME_ACTOR_H_
#define SPLITMOE_COMMON_RUNTIME_ACTOR_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/runtime/mailbox.h"
#include "common/runtime/manual_scheduler.h"
#include "common/runtime/reply.h"

namespace splitmoe::runtime {

using TimePoint = internal::TimePoint;  // std::chrono::steady_clock, or a ManualScheduler's

template <typename Message>
class ActorRef;
template <typename Message>
class Context;
namespace internal {
template <typename Message>
class ActorCore;
}  // namespace internal

// Names a pending timer so that it can be cancelled; default-constructed: no timer.
class TimerId {
 public:
  TimerId() = default;
  bool valid() const { return value_ != 0; }
  friend bool operator==(TimerId a, TimerId b) { return a.value_ == b.value_; }

 private:
  template <typename Message>
  friend class internal::ActorCore;
  explicit TimerId(uint64_t value) : value_(value) {}
  uint64_t value_ = 0;
};

namespace internal {

// The actor whose handler runs on this thread right now (its core), or nullptr.
const void* CurrentActor();

class CurrentActorScope {
 public:
  explicit CurrentActorScope(const void* actor);
  ~CurrentActorScope();
  CurrentActorScope(const CurrentActorScope&) = delete;
  CurrentActorScope& operator=(const CurrentActorScope&) = delete;

 private:
  const void* previous_;
};

// Logs `message` and aborts: for misuse of the runtime that can only be a bug.
[[noreturn]] void FatalBug(absl::string_view message);

// The control block an actor shares with its ActorRefs: name, mailbox and timers, but never the
// state, so that refs may outlive the actor. Thread-safe.
template <typename Message>
class ActorCore {
 public:
  ActorCore(std::string name, std::shared_ptr<SchedulerQueue> queue, uint64_t runnable_id)
      : name_(std::move(name)), queue_(std::move(queue)), runnable_id_(runnable_id) {}
  ActorCore(const ActorCore&) = delete;
  ActorCore& operator=(const ActorCore&) = delete;

  const std::string& name() const { return name_; }
  Mailbox<Message>& mailbox() { return mailbox_; }
  TimePoint Now() const { return queue_ != nullptr ? queue_->Now() : Clock::now(); }

  bool Send(Message&& message) {
    if (Push(std::move(message))) return true;
    // NOLINTNEXTLINE(bugprone-use-after-move): a failed Push leaves `message` untouched.
    Drop(std::move(message), DropScope::Reason::kStopped);
    return false;
  }

  TimerId ScheduleAfter(absl::Duration delay, Message&& message) {
    // Past a year a timer is as good as never; capping keeps the time arithmetic finite.
    delay = std::clamp(delay, absl::ZeroDuration(), absl::Hours(24 * 365));
    const TimePoint deadline =
        Now() + std::chrono::duration_cast<Clock::duration>(absl::ToChronoNanoseconds(delay));
    std::unique_lock<std::mutex> lock(timer_mu_);
    if (timers_closed_) {
      lock.unlock();
      Drop(std::move(message), DropScope::Reason::kStopped);
      return TimerId();
    }
    const uint64_t id = ++last_timer_id_;
    auto it = timers_.emplace(deadline, Timer{id, std::move(message)});
    timer_index_.emplace(id, it);
    const bool earliest = it == timers_.begin();
    lock.unlock();
    if (queue_ != nullptr) {
      queue_->AddWake(deadline, runnable_id_);
    } else if (earliest && CurrentActor() != this) {
      // The actor's thread may be asleep until a later deadline: make it look again. Its own
      // handlers need no wake-up, the loop reads the timers after every message.
      mailbox_.Interrupt();
    }
    return TimerId(id);
  }

  bool CancelTimer(TimerId timer) {
    std::unique_lock<std::mutex> lock(timer_mu_);
    auto it = timer_index_.find(timer.value_);
    if (it == timer_index_.end()) return false;
    Message cancelled(std::move(it->second->second.message));
    timers_.erase(it->second);
    timer_index_.erase(it);
    lock.unlock();
    Drop(std::move(cancelled), DropScope::Reason::kStopped);
    return true;
  }

  std::optional<TimePoint> NextDeadline() const {
    std::lock_guard<std::mutex> lock(timer_mu_);
    if (timers_.empty()) return std::nullopt;
    return timers_.begin()->first;
  }

  // Moves the due timers' messages into the mailbox, earliest first.
  void DeliverDueTimers() {
    const TimePoint now = Now();
    std::vector<Message> due;
    {
      std::lock_guard<std::mutex> lock(timer_mu_);
      while (!timers_.empty() && timers_.begin()->first <= now) {
        due.push_back(std::move(timers_.begin()->second.message));
        timer_index_.erase(timers_.begin()->second.id);
        timers_.erase(timers_.begin());
      }
    }
    for (Message& message : due) Send(std::move(message));
  }

  // Accepts nothing more (sends and timers fail from now on) and drops the pending timers.
  void Close() {
    mailbox_.Close();
    std::multimap<TimePoint, Timer> dropped;
    {
      std::lock_guard<std::mutex> lock(timer_mu_);
      timers_closed_ = true;
      dropped.swap(timers_);
      timer_index_.clear();
    }
    DropScope scope(DropScope::Reason::kStopped, &name_);
    dropped.clear();
  }

 private:
  struct Timer {
    uint64_t id;
    Message message;
  };

  bool Push(Message&& message) {
    if (queue_ == nullptr) return mailbox_.Push(std::move(message));
    return queue_->PushAndRecord(runnable_id_, [&] { return mailbox_.Push(std::move(message)); });
  }

  // Destroys `message`, failing its unanswered replies for `reason`.
  void Drop(Message&& message, DropScope::Reason reason) {
    DropScope scope(reason, &name_);
    [[maybe_unused]] Message dead(std::move(message));  // destroyed in the scope
  }

  const std::string name_;
  const std::shared_ptr<SchedulerQueue> queue_;  // null: the actor runs on its own thread
  const uint64_t runnable_id_;
  Mailbox<Message> mailbox_;

  mutable std::mutex timer_mu_;
  uint64_t last_timer_id_ = 0;              // guarded by timer_mu_
  std::multimap<TimePoint, Timer> timers_;  // guarded by timer_mu_; equal deadlines: FIFO
  std::unordered_map<uint64_t, typename std::multimap<TimePoint, Timer>::iterator>
      timer_index_;             // guarded by timer_mu_
  bool timers_closed_ = false;  // guarded by timer_mu_
};

template <typename T>
struct IsVariant : std::false_type {};
template <typename... Ts>
struct IsVariant<std::variant<Ts...>> : std::true_type {};

template <typename T>
inline constexpr bool kAlwaysFalse = false;

// Moves `alternative` into the State's handler for it.
template <typename State, typename Message, typename Alternative>
void CallHandler(State& state, Alternative& alternative, Context<Message>& context) {
  if constexpr (requires { state.Handle(std::move(alternative), context); }) {
    state.Handle(std::move(alternative), context);
  } else if constexpr (requires { state.Handle(std::move(alternative)); }) {
    state.Handle(std::move(alternative));
  } else {
    static_assert(kAlwaysFalse<Alternative>,
                  "the actor's State has no Handle(Alternative) or Handle(Alternative, "
                  "Context<Message>&) for this message");
  }
}

}  // namespace internal

// A handle that can only send to one actor. Copyable, cheap, usable from any thread; it keeps
// the actor's mailbox alive, never its state. A default-constructed ref points nowhere.
template <typename Message>
class ActorRef {
 public:
  ActorRef() = default;

  // Queues `message` and returns true; false once the actor is stopping or gone (or the ref is
  // empty), in which case the message is dropped and its Replies are answered with an error.
  bool Send(Message message) const {
    if (core_ == nullptr) {
      internal::DropScope scope(internal::DropScope::Reason::kNoActor, nullptr);
      [[maybe_unused]] Message dead(std::move(message));  // destroyed in the scope
      return false;
    }
    return core_->Send(std::move(message));
  }

  // The actor's name; empty for an empty ref.
  absl::string_view name() const { return core_ == nullptr ? absl::string_view() : core_->name(); }
  explicit operator bool() const { return core_ != nullptr; }
  friend bool operator==(const ActorRef& a, const ActorRef& b) { return a.core_ == b.core_; }

 private:
  template <typename State, typename M>
  friend class Actor;
  template <typename M>
  friend class Context;
  explicit ActorRef(std::shared_ptr<internal::ActorCore<Message>> core) : core_(std::move(core)) {}

  std::shared_ptr<internal::ActorCore<Message>> core_;
};

// What a handler may do besides changing its state: send to itself, set and cancel timers,
// read the clock (the virtual one under a ManualScheduler: use it, not absl::Now(), for
// anything a test should control). Only valid inside the actor's handlers.
template <typename Message>
class Context {
 public:
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  const std::string& name() const { return core_->name(); }
  ActorRef<Message> self() const { return ActorRef<Message>(core_); }
  TimePoint Now() const { return core_->Now(); }

  // Delivers `message` to this actor after `delay` (behind whatever is queued by then). Dropped
  // (its Replies failed) when the actor stops first; returns an invalid id if it already has.
  TimerId ScheduleAfter(absl::Duration delay, Message message) {
    return core_->ScheduleAfter(delay, std::move(message));
  }
  // True if the timer was pending; its message is dropped, its Replies failed.
  bool CancelTimer(TimerId timer) { return core_->CancelTimer(timer); }

 private:
  template <typename State, typename M>
  friend class Actor;
  explicit Context(std::shared_ptr<internal::ActorCore<Message>> core) : core_(std::move(core)) {}

  std::shared_ptr<internal::ActorCore<Message>> core_;
};

template <typename State, typename Message = typename State::Message>
class Actor final : private internal::Runnable {
 public:
  // Starts the actor: on a thread of its own, or attached to `scheduler` (tests), which must
  // then be driven from the thread that constructs this actor.
  Actor(std::string name, std::unique_ptr<State> state, ManualScheduler* scheduler = nullptr)
      : state_(std::move(state)),
        queue_(scheduler != nullptr ? scheduler->queue_ : nullptr),
        runnable_id_(queue_ != nullptr ? queue_->Attach(this) : 0),
        core_(
            std::make_shared<internal::ActorCore<Message>>(std::move(name), queue_, runnable_id_)),
        context_(core_) {
    if (state_ == nullptr) internal::FatalBug("Actor constructed without a state");
    if (queue_ == nullptr) thread_ = std::thread([this] { Loop(); });
  }
  Actor(const Actor&) = delete;
  Actor& operator=(const Actor&) = delete;

  // NOLINTNEXTLINE(bugprone-exception-escape): only a bug (a self-join) makes join() throw.
  ~Actor() override {
    if (internal::CurrentActor() == core_.get()) {
      internal::FatalBug("actor " + core_->name() + " destroyed from one of its own handlers");
    }
    Stop();
    if (queue_ != nullptr) queue_->Detach(runnable_id_);
    // Requests parked in the state are answered "stopped" as the state goes.
    internal::DropScope scope(internal::DropScope::Reason::kStopped, &core_->name());
    state_.reset();
  }

  const std::string& name() const { return core_->name(); }
  ActorRef<Message> ref() const { return ActorRef<Message>(core_); }
  // Same as ref().Send(message).
  bool Send(Message message) const { return core_->Send(std::move(message)); }
  // Same as Context::ScheduleAfter, from any thread.
  TimerId ScheduleAfter(absl::Duration delay, Message message) {
    return core_->ScheduleAfter(delay, std::move(message));
  }
  bool CancelTimer(TimerId timer) { return core_->CancelTimer(timer); }
  // Polls an empty mailbox this long before the actor's thread sleeps (Mailbox::SetIdleSpin):
  // for an actor whose next message is usually close behind and latency-critical.
  void SetIdleSpin(absl::Duration spin) { core_->mailbox().SetIdleSpin(spin); }

  // Draining stop: accepts nothing more, cancels the timers, handles what is queued, then joins
  // the thread (under a ManualScheduler: handles what is queued right here). Idempotent. From
  // one of the actor's own handlers it only closes the mailbox; the rest happens after that
  // handler returns, and a later Stop() or the destructor joins.
  void Stop() {
    core_->Close();
    if (internal::CurrentActor() == core_.get()) return;
    if (queue_ != nullptr) {
      while (RunOne()) {
      }
      return;
    }
    std::lock_guard<std::mutex> lock(join_mu_);
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Dispatch(Message&& message) {
    if constexpr (internal::IsVariant<Message>::value) {
      std::visit(
          [this](auto& alternative) { internal::CallHandler(*state_, alternative, context_); },
          message);
    } else {
      internal::CallHandler(*state_, message, context_);
    }
  }

  // The actor's own thread: handle messages, fire timers, until stopped and drained.
  void Loop() {
    internal::CurrentActorScope current(core_.get());
    internal::DropScope unanswered(internal::DropScope::Reason::kUnanswered, &core_->name());
    Mailbox<Message>& mailbox = core_->mailbox();
    auto dispatch = [this](Message&& message) { Dispatch(std::move(message)); };
    while (true) {
      core_->DeliverDueTimers();
      const std::optional<TimePoint> deadline = core_->NextDeadline();
      // No message: a deadline passed, an earlier timer was set (Interrupt), or stopped and
      // drained.
      const bool handled =
          deadline ? mailbox.PopUntilInto(*deadline, dispatch) : mailbox.PopInto(dispatch);
      if (!handled && mailbox.drained()) return;
    }
  }

  // internal::Runnable, for the ManualScheduler.
  bool RunOne() override {
    internal::CurrentActorScope current(core_.get());
    internal::DropScope unanswered(internal::DropScope::Reason::kUnanswered, &core_->name());
    return core_->mailbox().TryPopInto([this](Message&& message) { Dispatch(std::move(message)); });
  }
  void DeliverDueTimers() override { core_->DeliverDueTimers(); }

  std::unique_ptr<State> state_;
  const std::shared_ptr<internal::SchedulerQueue> queue_;  // null: own thread
  const uint64_t runnable_id_;
  const std::shared_ptr<internal::ActorCore<Message>> core_;
  Context<Message> context_;
  std::mutex join_mu_;
  std::thread thread_;  // last: starts once everything it uses exists
};

}  // namespace splitmoe::runtime

#endif  // SPLITMOE_COMMON_RUNTIME_ACTOR_H_
