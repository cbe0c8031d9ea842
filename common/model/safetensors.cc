#include "common/model/safetensors.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/file.h"
#include "common/base/json_text.h"
#include "common/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace splitmoe::model {
namespace {

using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // the format's own limit is 100 MB

bool ParseDType(absl::string_view s, DType* out) {
  static const std::pair<absl::string_view, DType> kNames[] = {
      {"F32", DType::kF32},        {"F16", DType::kF16}, {"BF16", DType::kBF16},
      {"F8_E4M3", DType::kF8E4M3}, {"I64", DType::kI64}, {"I32", DType::kI32},
      {"U8", DType::kU8}};
  for (const auto& [name, dtype] : kNames) {
    if (s == name) {
      *out = dtype;
      return true;
    }
  }
  return false;
}

absl::Status TensorError(const std::string& path, absl::string_view tensor,
                         absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", tensor, "': ", what));
}

}  // namespace

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kI64:
      return "I64";
    case DType::kI32:
      return "I32";
    case DType::kU8:
      return "U8";
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF8E4M3:
    case DType::kU8:
      return 1;
    case DType::kI64:
      return 8;
  }
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  // A FIFO, directory or device is refused here (RegularFile never blocks on open), before the
  // mmap that would fail or map something that is not a file.
  SPLITMOE_ASSIGN_OR_RETURN(RegularFile regular, RegularFile::Open(path));
  const size_t size = static_cast<size_t>(regular.size_bytes());
  if (size < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": truncated (", size, " bytes, no header)"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, regular.fd(), 0);
  if (map == MAP_FAILED) return absl::InternalError(absl::StrCat(path, ": mmap failed"));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->base_ = static_cast<const uint8_t*>(map);
  file->size_ = size;

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file->base_[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " exceeds the file (", size,
                                                   " bytes): truncated or not a safetensors file"));
  }
  const char* header_begin = reinterpret_cast<const char*>(file->base_ + 8);
  json header = json::parse(header_begin, header_begin + header_len, nullptr, false);
  if (header.is_discarded() || !header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }
  const size_t data_begin = 8 + header_len;
  const size_t data_bytes = size - data_begin;
  std::vector<const TensorInfo*> by_offset;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const json& entry = it.value();
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets")) {
      return TensorError(path, name, "entry lacks dtype, shape or data_offsets");
    }
    TensorInfo info;
    info.name = name;
    if (!entry["dtype"].is_string() ||
        !ParseDType(entry["dtype"].get<std::string>(), &info.dtype)) {
      return TensorError(path, name, absl::StrCat("unsupported dtype ", JsonForError(entry["dtype"])));
    }
    const json& shape = entry["shape"];
    if (!shape.is_array()) return TensorError(path, name, "shape is not an array");
    int64_t numel = 1;
    for (const json& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0 || d.get<int64_t>() > (int64_t{1} << 40)) {
        return TensorError(path, name, absl::StrCat("bad shape ", JsonForError(shape)));
      }
      info.shape.push_back(d.get<int64_t>());
      // Checked before multiplying: two dimensions of 2^32 overflow int64 (and wrapped to 0).
      if (d.get<int64_t>() != 0 && numel > (int64_t{1} << 40) / d.get<int64_t>()) {
        return TensorError(path, name, "shape too large");
      }
      numel *= d.get<int64_t>();
    }
    const json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      return TensorError(path, name, absl::StrCat("bad data_offsets ", JsonForError(offsets)));
    }
    uint64_t begin = offsets[0].get<uint64_t>();
    uint64_t end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_bytes) {
      return TensorError(
          path, name,
          absl::StrCat("data_offsets [", begin, ", ", end, ") out of range: the data region holds ",
                       data_bytes, " bytes (truncated file?)"));
    }
    uint64_t expected = static_cast<uint64_t>(numel) * DTypeSize(info.dtype);
    if (end - begin != expected) {
      return TensorError(path, name,
                         absl::StrCat("holds ", end - begin, " bytes but ", DTypeName(info.dtype),
                                      " ", ShapeString(info.shape), " needs ", expected));
    }
    info.offset = data_begin + begin;
    info.nbytes = end - begin;
    auto [pos, inserted] = file->tensors_.emplace(name, std::move(info));
    if (!inserted) return TensorError(path, name, "listed twice");
    by_offset.push_back(&pos->second);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo* prev = by_offset[i - 1];
    if (prev->nbytes > 0 && by_offset[i]->nbytes > 0 &&
        by_offset[i]->offset < prev->offset + prev->nbytes) {
      return TensorError(path, by_offset[i]->name,
                         absl::StrCat("data overlaps tensor '", prev->name, "'"));
    }
  }
  return file;
}

absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path) {
  SPLITMOE_ASSIGN_OR_RETURN(RegularFile file, RegularFile::Open(path));
  SafetensorsHeader header;
  header.file_bytes = file.size_bytes();
  if (header.file_bytes < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": truncated (", header.file_bytes, " bytes, no header)"));
  }
  unsigned char len_bytes[8];
  SPLITMOE_RETURN_IF_ERROR(file.ReadAt(0, 8, reinterpret_cast<char*>(len_bytes)));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeaderBytes || header_len > header.file_bytes - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " exceeds the file (", header.file_bytes,
                                                   " bytes): truncated or not a safetensors file"));
  }
  header.bytes.resize(static_cast<size_t>(8 + header_len));
  SPLITMOE_RETURN_IF_ERROR(file.ReadAt(0, header.bytes.size(), header.bytes.data()));
  return header;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::Span<const uint8_t> SafetensorsFile::Data(const TensorInfo& info) const {
  return absl::Span<const uint8_t>(base_ + info.offset, info.nbytes);
}

absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (t.data.size() != static_cast<size_t>(numel) * DTypeSize(t.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat("writing ", path, ": tensor '", t.name,
                                                     "' has ", t.data.size(), " bytes for shape ",
                                                     ShapeString(t.shape)));
    }
    header[t.name] = {{"dtype", std::string(DTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.data.size()}}};
    offset += t.data.size();
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot create"));
  uint64_t len = text.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out.write(len_bytes, 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const TensorToWrite& t : tensors) {
    out.write(reinterpret_cast<const char*>(t.data.data()),
              static_cast<std::streamsize>(t.data.size()));
  }
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace splitmoe::model
