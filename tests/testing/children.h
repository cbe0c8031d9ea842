// The child processes of a process (`splitmoe up`'s workers), read from /proc, for tests that
// kill one of them.
//
//   for (pid_t pid : testing::ChildrenMatching(up->pid(), {" expert ", " --shard 0 "})) ...
#ifndef SPLITMOE_TESTS_TESTING_CHILDREN_H_
#define SPLITMOE_TESTS_TESTING_CHILDREN_H_

#include <sys/types.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"

namespace splitmoe::testing {

// Every child of `parent` whose command line (arguments joined by spaces, with a trailing space)
// contains each of `parts`.
inline std::vector<pid_t> ChildrenMatching(pid_t parent, const std::vector<std::string>& parts) {
  std::vector<pid_t> out;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    std::getline(stat, line);
    const size_t close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::vector<std::string> fields = absl::StrSplit(line.substr(close + 2), ' ');
    if (fields.size() < 2 || std::stoi(fields[1]) != parent) continue;
    std::ifstream cmd(entry.path() / "cmdline");
    std::string argv((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
    std::replace(argv.begin(), argv.end(), '\0', ' ');
    bool all = true;
    for (const std::string& p : parts) all &= argv.find(p) != std::string::npos;
    if (all) out.push_back(std::stoi(name));
  }
  return out;
}

}  // namespace splitmoe::testing

#endif  // SPLITMOE_TESTS_TESTING_CHILDREN_H_
