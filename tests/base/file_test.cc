// RegularFile: regular files are read whole or in part; anything else (FIFO, directory, device)
// is refused at once with the path named, and sizes are bounded before anything is allocated.
#include "common/base/file.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "tests/testing/special_files.h"
#include "tests/testing/test_models.h"

namespace splitmoe {
namespace {

std::string WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  return path;
}

void ExpectRefused(const absl::Status& s, absl::StatusCode code, const std::string& path,
                   const std::string& why) {
  ASSERT_FALSE(s.ok()) << path;
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_NE(s.message().find(why), std::string::npos) << s;
}

TEST(RegularFileTest, ReadsARegularFileWholeAndInPart) {
  const std::string dir = testing::TempDir("file_regular");
  const std::string path = WriteFile(dir + "/a.json", "{\"x\": 12345}");
  absl::StatusOr<std::string> all = ReadRegularFile(path, 1 << 20);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(*all, "{\"x\": 12345}");
  absl::StatusOr<RegularFile> file = RegularFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->size_bytes(), 12u);
  char part[5];
  ASSERT_TRUE(file->ReadAt(6, 5, part).ok());
  EXPECT_EQ(std::string(part, 5), "12345");
  ExpectRefused(file->ReadAt(10, 5, part), absl::StatusCode::kDataLoss, path, "ends at byte");
  absl::StatusOr<bool> exists = RegularFileExists(path);
  ASSERT_TRUE(exists.ok());
  EXPECT_TRUE(*exists);
  absl::StatusOr<std::string> empty = ReadRegularFile(WriteFile(dir + "/empty", ""), 10);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, "");
}

TEST(RegularFileTest, BoundsTheSize) {
  const std::string dir = testing::TempDir("file_size");
  const std::string path = WriteFile(dir + "/big", std::string(100, 'x'));
  EXPECT_TRUE(ReadRegularFile(path, 100).ok());
  ExpectRefused(ReadRegularFile(path, 99).status(), absl::StatusCode::kInvalidArgument, path,
                "100 bytes exceeds the limit of 99 bytes");
}

TEST(RegularFileTest, MissingIsNotFound) {
  const std::string path = testing::TempDir("file_missing") + "/nope.json";
  ExpectRefused(ReadRegularFile(path, 10).status(), absl::StatusCode::kNotFound, path,
                "cannot open");
  absl::StatusOr<bool> exists = RegularFileExists(path);
  ASSERT_TRUE(exists.ok()) << exists.status();
  EXPECT_FALSE(*exists);
}

TEST(RegularFileTest, RefusesFifoDirectoryAndDeviceWithoutBlocking) {
  const std::string dir = testing::TempDir("file_special");
  const std::string fifo = dir + "/fifo.json";
  testing::MakeFifo(fifo);
  absl::Status s =
      testing::RunWithDeadline([&] { return ReadRegularFile(fifo, 1 << 20).status(); }, {fifo});
  ExpectRefused(s, absl::StatusCode::kInvalidArgument, fifo, "not a regular file (a FIFO)");
  ExpectRefused(RegularFileExists(fifo).status(), absl::StatusCode::kInvalidArgument, fifo,
                "a FIFO");
  const std::string sub = dir + "/sub.json";
  testing::MakeDirectory(sub);
  ExpectRefused(ReadRegularFile(sub, 1 << 20).status(), absl::StatusCode::kInvalidArgument, sub,
                "not a regular file (a directory)");
  ExpectRefused(RegularFileExists(sub).status(), absl::StatusCode::kInvalidArgument, sub,
                "a directory");
  // /dev/zero would otherwise feed an endless file.
  ExpectRefused(RegularFile::Open("/dev/zero").status(), absl::StatusCode::kInvalidArgument,
                "/dev/zero", "a character device");
}

TEST(RegularFileTest, FollowsASymlinkToARegularFile) {
  const std::string dir = testing::TempDir("file_link");
  WriteFile(dir + "/target", "abc");
  std::filesystem::create_symlink(dir + "/target", dir + "/link");
  absl::StatusOr<std::string> bytes = ReadRegularFile(dir + "/link", 10);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, "abc");
}

}  // namespace
}  // namespace splitmoe
