#include "common/process/subprocess.h"

#include <signal.h>

#include "gtest/gtest.h"

namespace splitmoe::process {
namespace {

TEST(SubprocessTest, ReadsTheAnnouncedLineAndTerminates) {
  auto p = Subprocess::Start(
      "child", {"/bin/sh", "-c", "echo noise; echo listening 127.0.0.1:4242; exec sleep 30"});
  ASSERT_TRUE(p.ok()) << p.status();
  auto line = (*p)->ReadLineMatching("listening ", absl::Seconds(10));
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(*line, "127.0.0.1:4242");
  EXPECT_FALSE((*p)->Poll().has_value());
  const absl::Time start = absl::Now();
  EXPECT_EQ((*p)->Terminate(absl::Seconds(5)), "killed by signal 15");
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST(SubprocessTest, ReportsAChildThatDiesBeforeAnnouncing) {
  auto p = Subprocess::Start("crasher", {"/bin/sh", "-c", "exit 3"});
  ASSERT_TRUE(p.ok());
  auto line = (*p)->ReadLineMatching("listening ", absl::Seconds(10));
  ASSERT_FALSE(line.ok());
  EXPECT_EQ(line.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(line.status().message().find("exited with code 3"), std::string::npos) << line.status();
}

TEST(SubprocessTest, TimesOutAndKillsAStubbornChild) {
  // The child ignores SIGTERM: Terminate escalates to SIGKILL after the grace period.
  auto p = Subprocess::Start(
      "stubborn", {"/bin/sh", "-c", "trap '' TERM; echo up; while true; do sleep 1; done"});
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE((*p)->ReadLineMatching("up", absl::Seconds(10)).ok());
  auto line = (*p)->ReadLineMatching("never ", absl::Milliseconds(300));
  EXPECT_EQ(line.status().code(), absl::StatusCode::kDeadlineExceeded);
  std::string why = (*p)->Terminate(absl::Milliseconds(300));
  EXPECT_NE(why.find("SIGKILL"), std::string::npos) << why;
}

TEST(SubprocessTest, MissingExecutableIsReported) {
  auto p = Subprocess::Start("ghost", {"/nonexistent/binary"});
  ASSERT_TRUE(p.ok());  // fork succeeds; exec fails in the child
  auto line = (*p)->ReadLineMatching("listening ", absl::Seconds(10));
  ASSERT_FALSE(line.ok());
  EXPECT_NE(line.status().message().find("exited with code 127"), std::string::npos)
      << line.status();
}

}  // namespace
}  // namespace splitmoe::process
