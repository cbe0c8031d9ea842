// Reply<T>: the answer slot of a request message ("ask"). A message that wants an answer carries
// a Reply<T> field built from a callback `void(absl::StatusOr<T>)` (`void(absl::Status)` for
// Reply<void>); the handling actor answers it exactly once by calling it. A Reply is move-only
// and is never lost silently: if it is destroyed unanswered, its callback still runs, with
//   - UnavailableError("actor <name> stopped") when the runtime drops the message because the
//     actor stopped before handling it (sent after Stop, a pending timer, a request parked in the
//     actor's state when the actor is destroyed),
//   - InternalError("actor <name> dropped a request without replying") when a handler lets it
//     go out of scope unanswered (a bug),
//   - InternalError("request dropped without a reply") anywhere else.
// The callback runs on whichever thread answers or drops: the answering actor's thread, the
// sender's thread when Send fails, or the thread that stops the actor. Keep it short and
// thread-safe: typically it sends a message to the asker or finishes a gRPC call.
//
//   struct GetLoad { std::string worker; runtime::Reply<double> reply; };
//   registry.Send(GetLoad{"w1", [](absl::StatusOr<double> load) { ... }});
//   // in the registry's handler:
//   void Handle(GetLoad get) { get.reply(LoadOf(get.worker)); }  // or an error status
#ifndef SPLITMOE_COMMON_RUNTIME_REPLY_H_
#define SPLITMOE_COMMON_RUNTIME_REPLY_H_

#include <functional>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace splitmoe::runtime {
namespace internal {

// While a DropScope lives on a thread, Replies destroyed unanswered on that thread are failed
// with the scope's status. The runtime opens one around every place it drops messages and around
// every handler it runs; scopes nest.
class DropScope {
 public:
  enum class Reason {
    kStopped,     // the actor stopped before handling the message
    kUnanswered,  // a handler of the actor let a request go unanswered
    kNoActor,     // sent through an empty ActorRef
  };
  DropScope(Reason reason, const std::string* actor_name);
  ~DropScope();
  DropScope(const DropScope&) = delete;
  DropScope& operator=(const DropScope&) = delete;

  // The status for a Reply destroyed unanswered on this thread right now.
  static absl::Status CurrentDropStatus();

 private:
  Reason reason_;
  const std::string* actor_name_;
  DropScope* previous_;
};

template <typename T>
struct ReplyResult {
  using Type = absl::StatusOr<T>;
};
template <>
struct ReplyResult<void> {
  using Type = absl::Status;
};

}  // namespace internal

template <typename T>
class Reply {
 public:
  using Result = typename internal::ReplyResult<T>::Type;  // StatusOr<T>, or Status for void
  using Callback = std::function<void(Result)>;

  // An empty reply: nobody waits for the answer.
  Reply() = default;
  // Implicit, so that a lambda can initialise a message's reply field:
  // `Send(Get{[](absl::StatusOr<int> v) {...}})`.
  template <typename F, typename = std::enable_if_t<!std::is_same_v<std::decay_t<F>, Reply> &&
                                                    std::is_constructible_v<Callback, F>>>
  Reply(F&& callback)  // NOLINT(google-explicit-constructor)
      : callback_(std::forward<F>(callback)) {}

  Reply(Reply&& other) noexcept : callback_(std::exchange(other.callback_, nullptr)) {}
  Reply& operator=(Reply&& other) noexcept {
    if (this != &other) {
      FailIfPending();
      callback_ = std::exchange(other.callback_, nullptr);
    }
    return *this;
  }
  Reply(const Reply&) = delete;
  Reply& operator=(const Reply&) = delete;
  ~Reply() { FailIfPending(); }

  // Answers; later calls (and calls on an empty reply) do nothing.
  void operator()(Result result) {
    Callback callback = std::exchange(callback_, nullptr);
    if (callback) callback(std::move(result));
  }
  // Answers Reply<void> with OK.
  template <typename U = T, typename = std::enable_if_t<std::is_void_v<U>>>
  void operator()() {
    (*this)(absl::OkStatus());
  }

  // True while someone waits for an answer.
  bool pending() const { return callback_ != nullptr; }

 private:
  void FailIfPending() {
    if (callback_) (*this)(internal::DropScope::CurrentDropStatus());
  }

  Callback callback_;
};

}  // namespace splitmoe::runtime

#endif  // SPLITMOE_COMMON_RUNTIME_REPLY_H_
