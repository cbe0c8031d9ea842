// Fuzzes the safetensors reader: the input is a whole .safetensors file (8-byte header length,
// JSON header, data), opened by SafetensorsFile::Open and ReadSafetensorsHeader through a memfd.
// What Open promises is checked on every file it accepts: each tensor lies inside the data
// region, holds numel * dtype-size bytes, no two overlap, Find() and Data() agree; and
// ReadSafetensorsHeader returns exactly the stored header of any file Open accepts.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common/model/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

namespace splitmoe::fuzz {
namespace {

void Check(const uint8_t* data, size_t size) {
  static MemFile file;
  const std::string path = file.Replace(data, size);
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> opened =
      model::SafetensorsFile::Open(path);
  absl::StatusOr<model::SafetensorsHeader> header = model::ReadSafetensorsHeader(path);
  if (!opened.ok()) {
    FUZZ_CHECK(!opened.status().message().empty(), "an error without a message");
    return;
  }
  const model::SafetensorsFile& f = **opened;
  FUZZ_CHECK(size >= 8, "accepted a file of " << size << " bytes");
  uint64_t header_len = 0;
  std::memcpy(&header_len, data, 8);  // little-endian on every machine this builds for
  FUZZ_CHECK(header_len <= size - 8, "header length " << header_len << " past the end");
  const size_t data_start = 8 + header_len;
  FUZZ_CHECK(f.file_bytes() == size, "file_bytes " << f.file_bytes() << " != " << size);

  FUZZ_CHECK(header.ok(), "Open accepted what ReadSafetensorsHeader refuses: " << header.status());
  FUZZ_CHECK(header->file_bytes == size, "header file_bytes " << header->file_bytes);
  FUZZ_CHECK(header->bytes.size() == data_start &&
                 std::memcmp(header->bytes.data(), data, data_start) == 0,
             "ReadSafetensorsHeader did not return the stored header");

  std::vector<std::pair<size_t, size_t>> extents;
  uint64_t sum = 0;
  for (const auto& [name, info] : f.tensors()) {
    FUZZ_CHECK(info.name == name, "tensor keyed " << name << " is named " << info.name);
    FUZZ_CHECK(f.Find(name) == &info, "Find(" << name << ") is not the listed tensor");
    int64_t numel = 1;
    for (int64_t d : info.shape) {
      FUZZ_CHECK(d >= 0, name << " has a negative dimension");
      numel *= d;  // an overflow here is a UBSan report: Open must have bounded the shape
    }
    FUZZ_CHECK(info.numel() == numel, name << " numel " << info.numel() << " != " << numel);
    FUZZ_CHECK(info.nbytes == static_cast<size_t>(numel) * model::DTypeSize(info.dtype),
               name << " holds " << info.nbytes << " bytes for " << numel << " elements");
    FUZZ_CHECK(
        info.offset >= data_start && info.offset <= size && info.nbytes <= size - info.offset,
        name << " at [" << info.offset << ", +" << info.nbytes << ") outside the data ["
             << data_start << ", " << size << ")");
    absl::Span<const uint8_t> bytes = f.Data(info);
    FUZZ_CHECK(bytes.size() == info.nbytes, name << " Data() size " << bytes.size());
    FUZZ_CHECK(bytes.empty() || std::memcmp(bytes.data(), data + info.offset, bytes.size()) == 0,
               name << " Data() is not the file's bytes");
    for (uint8_t b : bytes) sum += b;
    if (info.nbytes > 0) extents.emplace_back(info.offset, info.offset + info.nbytes);
    (void)model::DTypeName(info.dtype);
    (void)model::ShapeString(info.shape);
  }
  std::sort(extents.begin(), extents.end());
  for (size_t i = 1; i < extents.size(); ++i) {
    FUZZ_CHECK(extents[i].first >= extents[i - 1].second,
               "tensors overlap at byte " << extents[i].first);
  }
  volatile uint64_t sink = sum;
  (void)sink;
}

}  // namespace
}  // namespace splitmoe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > splitmoe::fuzz::kMaxInputBytes) return -1;
  splitmoe::fuzz::Check(data, size);
  return 0;
}
