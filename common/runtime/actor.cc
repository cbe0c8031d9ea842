#include "common/runtime/actor.h"

#include "common/base/log.h"

#include <cstdlib>
#include <string>

#include "glog/logging.h"

namespace splitmoe::runtime::internal {
namespace {

thread_local const void* current_actor = nullptr;

}  // namespace

const void* CurrentActor() { return current_actor; }

CurrentActorScope::CurrentActorScope(const void* actor) : previous_(current_actor) {
  current_actor = actor;
}

CurrentActorScope::~CurrentActorScope() { current_actor = previous_; }

void FatalBug(absl::string_view message) {
  SPLITMOE_LOG(ERROR, "runtime") << "fatal bug: " << message;
  std::abort();
}

}  // namespace splitmoe::runtime::internal
