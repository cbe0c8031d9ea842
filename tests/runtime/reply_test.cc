#include "common/runtime/reply.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace splitmoe::runtime {
namespace {

TEST(ReplyTest, AnswersOnceOnly) {
  std::vector<absl::StatusOr<int>> answers;
  Reply<int> reply([&](absl::StatusOr<int> v) { answers.push_back(std::move(v)); });
  EXPECT_TRUE(reply.pending());
  reply(7);
  reply(8);  // ignored
  EXPECT_FALSE(reply.pending());
  ASSERT_EQ(answers.size(), 1u);
  EXPECT_EQ(*answers[0], 7);
}

TEST(ReplyTest, UnansweredReplyFailsWhenDestroyed) {
  absl::StatusOr<std::string> answer = std::string("untouched");
  {
    Reply<std::string> reply([&](absl::StatusOr<std::string> v) { answer = std::move(v); });
  }
  EXPECT_EQ(answer.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(answer.status().message(), "request dropped without a reply");
}

TEST(ReplyTest, DropScopeNamesTheActor) {
  const std::string name = "registry";
  absl::Status answer;
  {
    internal::DropScope outer(internal::DropScope::Reason::kUnanswered, &name);
    {
      internal::DropScope inner(internal::DropScope::Reason::kStopped, &name);
      Reply<void> reply([&](absl::Status s) { answer = std::move(s); });
    }
    EXPECT_EQ(answer.code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(answer.message(), "actor registry stopped");
    Reply<void> reply([&](absl::Status s) { answer = std::move(s); });
  }
  EXPECT_EQ(answer.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(answer.message(), "actor registry dropped a request without replying");
}

TEST(ReplyTest, MovingKeepsOneAnswer) {
  int calls = 0;
  absl::Status last;
  Reply<void> a([&](absl::Status s) {
    ++calls;
    last = std::move(s);
  });
  Reply<void> b(std::move(a));
  // NOLINTNEXTLINE(bugprone-use-after-move,clang-analyzer-cplusplus.Move): the contract tested.
  EXPECT_FALSE(a.pending());
  Reply<void> c;
  c = std::move(b);
  c();
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(last.ok());

  // Assigning over a pending reply fails the old one first: nothing is lost.
  int old_calls = 0;
  Reply<void> d([&](const absl::Status&) { ++old_calls; });
  d = Reply<void>([](const absl::Status&) {});
  EXPECT_EQ(old_calls, 1);
}

TEST(ReplyTest, EmptyReplyIgnoresAnswers) {
  Reply<int> reply;
  EXPECT_FALSE(reply.pending());
  reply(absl::NotFoundError("x"));  // nobody waits; nothing happens
}

}  // namespace
}  // namespace splitmoe::runtime
