#include "common/runtime/reply.h"

#include "absl/strings/str_cat.h"

namespace splitmoe::runtime::internal {
namespace {

thread_local DropScope* current_scope = nullptr;

}  // namespace

DropScope::DropScope(Reason reason, const std::string* actor_name)
    : reason_(reason), actor_name_(actor_name), previous_(current_scope) {
  current_scope = this;
}

DropScope::~DropScope() { current_scope = previous_; }

absl::Status DropScope::CurrentDropStatus() {
  const DropScope* scope = current_scope;
  if (scope == nullptr) return absl::InternalError("request dropped without a reply");
  const absl::string_view name = scope->actor_name_ != nullptr
                                     ? absl::string_view(*scope->actor_name_)
                                     : absl::string_view("?");
  switch (scope->reason_) {
    case Reason::kStopped:
      return absl::UnavailableError(absl::StrCat("actor ", name, " stopped"));
    case Reason::kUnanswered:
      return absl::InternalError(
          absl::StrCat("actor ", name, " dropped a request without replying"));
    case Reason::kNoActor:
      return absl::FailedPreconditionError("message sent through an empty ActorRef");
  }
  return absl::InternalError("request dropped without a reply");
}

}  // namespace splitmoe::runtime::internal
