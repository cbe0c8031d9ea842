// Helpers for tests that hand a loader something that is not a regular file (a FIFO, a
// directory) and check that it answers with an error instead of hanging.
//
//   testing::MakeFifo(dir + "/config.json");
//   absl::Status s = testing::RunWithDeadline([&] { return LoadModelConfig(dir).status(); },
//                                             {dir + "/config.json"});
//   EXPECT_FALSE(s.ok());
#ifndef SPLITMOE_TESTS_TESTING_SPECIAL_FILES_H_
#define SPLITMOE_TESTS_TESTING_SPECIAL_FILES_H_

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace splitmoe::testing {

// Replaces whatever is at `path` with a FIFO.
inline void MakeFifo(const std::string& path) {
  std::filesystem::remove_all(path);
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0) << path;
}

// Replaces whatever is at `path` with an empty directory.
inline void MakeDirectory(const std::string& path) {
  std::filesystem::remove_all(path);
  ASSERT_TRUE(std::filesystem::create_directory(path)) << path;
}

// Runs `fn` on another thread and returns its status. Should it not return within `deadline`
// (a loader blocked opening or reading a FIFO), the test fails and each of `fifos` is opened for
// writing and closed, which hands a blocked reader an end of file, so the test ends instead of
// hanging.
inline absl::Status RunWithDeadline(std::function<absl::Status()> fn,
                                    const std::vector<std::string>& fifos,
                                    std::chrono::seconds deadline = std::chrono::seconds(10)) {
  std::future<absl::Status> result = std::async(std::launch::async, std::move(fn));
  while (result.wait_for(deadline) != std::future_status::ready) {
    ADD_FAILURE() << "still running after " << deadline.count() << " s: blocked on a FIFO?";
    deadline = std::chrono::seconds(1);
    for (const std::string& fifo : fifos) {
      const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
      if (fd >= 0) ::close(fd);
    }
  }
  return result.get();
}

}  // namespace splitmoe::testing

#endif  // SPLITMOE_TESTS_TESTING_SPECIAL_FILES_H_
