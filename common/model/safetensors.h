// Reading and writing `.safetensors` files (the Hugging Face weight format): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
//
// SafetensorsFile memory-maps the file (after checking it is a regular file: a FIFO or device
// is refused, never waited on) and validates the whole header on Open (known dtypes,
// offsets inside the data region, sizes matching shapes, no overlapping tensors), so a bad file
// is refused with an error naming the file and tensor before any weight is touched. Pages are
// only read when a tensor's data is used: opening a shard and taking one tensor reads that
// tensor and the header, nothing else. Immutable after Open; safe to share across threads.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open("model.safetensors"));
//   const TensorInfo* info = file->Find("model.norm.weight");
//   absl::Span<const uint8_t> bytes = file->Data(*info);
#ifndef SPLITMOE_COMMON_MODEL_SAFETENSORS_H_
#define SPLITMOE_COMMON_MODEL_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace splitmoe::model {

enum class DType { kF32, kF16, kBF16, kF8E4M3, kI64, kI32, kU8 };

absl::string_view DTypeName(DType dtype);  // the safetensors spelling: "BF16", "F8_E4M3", ...
size_t DTypeSize(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  size_t offset = 0;  // absolute byte offset in the file
  size_t nbytes = 0;
  int64_t numel() const;
};

std::string ShapeString(absl::Span<const int64_t> shape);  // "[64, 128]"

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const TensorInfo* Find(absl::string_view name) const;
  const std::map<std::string, TensorInfo, std::less<>>& tensors() const { return tensors_; }
  absl::Span<const uint8_t> Data(const TensorInfo& info) const;
  size_t file_bytes() const { return size_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* base_ = nullptr;  // mmap of the whole file, read-only
  size_t size_ = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
};

// The header of a safetensors file as stored (the 8-byte length and the JSON, exactly
// 8 + length bytes) and the file's size: what identifies the file's contents short of reading
// its data. Used by the model fingerprint; the header is bounded by the format's 100 MB limit.
struct SafetensorsHeader {
  uint64_t file_bytes = 0;
  std::string bytes;
};
absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path);

// One tensor to write: `data` holds exactly numel * DTypeSize(dtype) bytes.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kBF16;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

// Writes tensors in the given order (offsets ascending, 8-byte aligned header as the format
// recommends). Metadata {"format": "pt"} like the files torch writes.
absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors);

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_SAFETENSORS_H_
