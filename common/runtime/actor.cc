#include "common/runtime/actor.h"

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
  LOG(FATAL) << "splitmoe::runtime: " << std::string(message);
  std::abort();  // LOG(FATAL) does not return; this tells the compiler so
}

}  // namespace splitmoe::runtime::internal
