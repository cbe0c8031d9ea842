// Reading the files of a model directory (config.json, tokenizer.json, the safetensors index and
// shards) safely: every such file is opened through RegularFile, which never blocks and refuses
// anything but a regular file. A FIFO, directory or device named config.json would otherwise hang
// the process at open() (a FIFO waits for a writer) or feed it endless bytes (/dev/zero); here
// it is an error that names the path. Sizes are bounded before anything is allocated.
// Stateless functions and a move-only handle; any thread.
//
//   SPLITMOE_ASSIGN_OR_RETURN(std::string text,
//                             ReadRegularFile(dir + "/config.json", kMaxConfigJsonBytes));
//   SPLITMOE_ASSIGN_OR_RETURN(bool present, RegularFileExists(dir + "/tokenizer.json"));
//   SPLITMOE_ASSIGN_OR_RETURN(RegularFile f, RegularFile::Open(path));  // then mmap f.fd()
#ifndef SPLITMOE_COMMON_BASE_FILE_H_
#define SPLITMOE_COMMON_BASE_FILE_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitmoe {

// An open regular file: opened O_RDONLY | O_NONBLOCK | O_CLOEXEC (so opening a FIFO returns at
// once), then fstat()ed and refused unless it is a regular file of at most `max_bytes`.
class RegularFile {
 public:
  // Errors: NotFound when the path does not exist ("<path>: cannot open: ..."), InvalidArgument
  // when it is not a regular file ("<path>: not a regular file (a FIFO)") or larger than
  // `max_bytes`, PermissionDenied / Internal for the other failures of open() and fstat().
  static absl::StatusOr<RegularFile> Open(
      const std::string& path, uint64_t max_bytes = std::numeric_limits<uint64_t>::max());

  RegularFile(RegularFile&& other) noexcept;
  RegularFile& operator=(RegularFile&& other) noexcept;
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  ~RegularFile();

  const std::string& path() const { return path_; }
  int fd() const { return fd_; }
  uint64_t size_bytes() const { return size_bytes_; }  // as fstat() saw it at Open

  // Reads exactly `count` bytes at `offset` into `out`; DataLoss when the file ends first
  // (truncated since Open).
  absl::Status ReadAt(uint64_t offset, size_t count, char* out) const;
  // The whole file (size_bytes() bytes).
  absl::StatusOr<std::string> ReadAll() const;

 private:
  RegularFile(std::string path, int fd, uint64_t size_bytes)
      : path_(std::move(path)), fd_(fd), size_bytes_(size_bytes) {}
  std::string path_;
  int fd_ = -1;
  uint64_t size_bytes_ = 0;
};

// Opens `path` as above and returns its bytes.
absl::StatusOr<std::string> ReadRegularFile(const std::string& path, uint64_t max_bytes);

// False when nothing exists at `path`; true when a regular file (or a link to one) does;
// InvalidArgument naming the path when something else does (a directory, FIFO, socket, device),
// so that an optional file is never silently skipped nor opened in a way that blocks.
absl::StatusOr<bool> RegularFileExists(const std::string& path);

}  // namespace splitmoe

#endif  // SPLITMOE_COMMON_BASE_FILE_H_
