#include "common/model/checkpoint.h"

#include <filesystem>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/base/log.h"
#include "common/base/file.h"
#include "common/base/status_macros.h"
#include "common/model/numeric.h"
#include "nlohmann/json.hpp"

namespace splitmoe::model {
namespace {

using nlohmann::json;

// Parses model.safetensors.index.json's weight_map (tensor -> shard file name), refusing file
// names that leave the directory.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ReadIndex(
    const std::string& index_path) {
  SPLITMOE_ASSIGN_OR_RETURN(std::string text, ReadRegularFile(index_path, kMaxIndexJsonBytes));
  json index = json::parse(text, nullptr, false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
      !index["weight_map"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": no weight_map object"));
  }
  std::vector<std::pair<std::string, std::string>> entries;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": tensor '", it.key(), "' maps to a non-string"));
    }
    std::string file = it.value().get<std::string>();
    if (file.empty() || absl::StrContains(file, "/") || absl::StrContains(file, "..")) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": tensor '", it.key(), "' maps to an invalid file name '", file, "'"));
    }
    entries.emplace_back(it.key(), std::move(file));
  }
  return entries;
}

bool IsFloatDType(DType d) {
  return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16 || d == DType::kF8E4M3;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  SPLITMOE_ASSIGN_OR_RETURN(ckpt->config_, LoadModelConfig(dir));
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  // Either is refused (not skipped) when it exists but is not a regular file.
  SPLITMOE_ASSIGN_OR_RETURN(const bool has_index, RegularFileExists(index_path));
  if (has_index) {
    SPLITMOE_ASSIGN_OR_RETURN(auto entries, ReadIndex(index_path));
    for (auto& [tensor, file] : entries) {
      ckpt->names_.push_back(tensor);
      ckpt->weight_map_.emplace(std::move(tensor), std::move(file));
    }
    return ckpt;
  }
  SPLITMOE_ASSIGN_OR_RETURN(const bool has_single, RegularFileExists(single_path));
  if (has_single) {
    SPLITMOE_ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> file, ckpt->OpenFile("model.safetensors"));
    for (const auto& [name, info] : file->tensors()) {
      ckpt->weight_map_.emplace(name, "model.safetensors");
      ckpt->names_.push_back(name);
    }
  } else {
    return absl::NotFoundError(
        absl::StrCat(dir, ": neither model.safetensors nor model.safetensors.index.json"));
  }
  return ckpt;
}

absl::StatusOr<std::vector<std::string>> WeightFileNames(const std::string& dir) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::set<std::string> names;
  SPLITMOE_ASSIGN_OR_RETURN(const bool has_index, RegularFileExists(index_path));
  if (has_index) {
    SPLITMOE_ASSIGN_OR_RETURN(auto entries, ReadIndex(index_path));
    for (auto& [tensor, file] : entries) names.insert(std::move(file));
    return std::vector<std::string>(names.begin(), names.end());
  }
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec) return absl::NotFoundError(absl::StrCat(dir, ": cannot list: ", ec.message()));
  for (; it != std::filesystem::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (absl::EndsWith(name, ".safetensors")) names.insert(name);
  }
  if (ec) return absl::InternalError(absl::StrCat(dir, ": listing failed: ", ec.message()));
  return std::vector<std::string>(names.begin(), names.end());
}

bool Checkpoint::Has(absl::string_view name) const { return weight_map_.count(name) > 0; }

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Checkpoint::OpenFile(
    const std::string& file_name) {
  auto it = files_.find(file_name);
  if (it != files_.end()) return it->second;
  SPLITMOE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                            SafetensorsFile::Open(dir_ + "/" + file_name));
  std::shared_ptr<const SafetensorsFile> shared(std::move(file));
  files_.emplace(file_name, shared);
  return shared;
}

absl::StatusOr<Checkpoint::Located> Checkpoint::Locate(const std::string& name) {
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": missing tensor '", name, "'"));
  }
  SPLITMOE_ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> file, OpenFile(it->second));
  const TensorInfo* info = file->Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(file->path(), ": missing tensor '", name,
                                            "' (the index says it is in this file)"));
  }
  return Located{std::move(file), info};
}

absl::StatusOr<std::vector<float>> Checkpoint::LoadFloat(const std::string& name,
                                                         const std::vector<int64_t>& shape) {
  SPLITMOE_ASSIGN_OR_RETURN(Located loc, Locate(name));
  const TensorInfo& info = *loc.info;
  const std::string& path = loc.file->path();
  if (info.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "': expected shape ",
                                                   ShapeString(shape), ", found ",
                                                   ShapeString(info.shape)));
  }
  if (!IsFloatDType(info.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor '", name, "': dtype ", DTypeName(info.dtype),
                     " is not a weight dtype (BF16, F16, F32, F8_E4M3)"));
  }
  std::vector<float> out(static_cast<size_t>(info.numel()));
  ConvertToFloat(info.dtype, loc.file->Data(info).data(), info.numel(), out.data());
  bytes_read_ += info.nbytes;
  consumed_.insert(name);
  LogProgress();
  const std::string scale_name = name + "_scale_inv";
  if (info.dtype == DType::kF8E4M3) {
    if (shape.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", name, "': F8_E4M3 is only supported for 2-D weights"));
    }
    const int64_t rows = shape[0], cols = shape[1];
    SPLITMOE_ASSIGN_OR_RETURN(std::vector<float> scales, LoadScales(name, path, rows, cols));
    const int64_t scols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
    for (int64_t r = 0; r < rows; ++r) {
      const float* srow = scales.data() + (r / kFp8BlockSize) * scols;
      float* orow = out.data() + r * cols;
      for (int64_t c = 0; c < cols; ++c) orow[c] *= srow[c / kFp8BlockSize];
    }
  } else if (Has(scale_name)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor '", name, "' is ", DTypeName(info.dtype), " but has a '",
                     scale_name, "' (only F8_E4M3 weights are scaled)"));
  }
  return out;
}

absl::StatusOr<std::vector<float>> Checkpoint::LoadScales(const std::string& name,
                                                          const std::string& path, int64_t rows,
                                                          int64_t cols) {
  const std::string scale_name = name + "_scale_inv";
  const int64_t srows = (rows + kFp8BlockSize - 1) / kFp8BlockSize;
  const int64_t scols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  if (!Has(scale_name)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor '", name, "' is F8_E4M3 but '", scale_name, "' is missing"));
  }
  SPLITMOE_ASSIGN_OR_RETURN(Located sloc, Locate(scale_name));
  if (sloc.info->dtype != DType::kF32 && sloc.info->dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(sloc.file->path(), ": tensor '", scale_name,
                                                   "': dtype ", DTypeName(sloc.info->dtype),
                                                   ", expected F32"));
  }
  if (sloc.info->shape != std::vector<int64_t>{srows, scols}) {
    return absl::InvalidArgumentError(
        absl::StrCat(sloc.file->path(), ": tensor '", scale_name, "': expected shape ",
                     ShapeString({srows, scols}), " (one scale per 128x128 block of ",
                     ShapeString({rows, cols}), "), found ", ShapeString(sloc.info->shape)));
  }
  std::vector<float> scales(static_cast<size_t>(srows * scols));
  ConvertToFloat(sloc.info->dtype, sloc.file->Data(*sloc.info).data(), srows * scols,
                 scales.data());
  bytes_read_ += sloc.info->nbytes;
  consumed_.insert(scale_name);
  LogProgress();
  return scales;
}

uint64_t Checkpoint::total_bytes() const {
  if (total_bytes_ == 0) {
    std::set<std::string> files;
    for (const auto& [tensor, file] : weight_map_) files.insert(file);
    for (const std::string& f : files) {
      std::error_code ec;
      const uintmax_t size = std::filesystem::file_size(std::filesystem::path(dir_) / f, ec);
      if (!ec) total_bytes_ += size;
    }
  }
  return total_bytes_;
}

void Checkpoint::LogProgress(bool final) {
  const absl::Time now = absl::Now();
  if (!final && now - last_progress_ < absl::Seconds(2)) return;
  last_progress_ = now;
  SPLITMOE_LOG(INFO, "model")
          .With("tensors", absl::StrCat(consumed_.size(), "/", names_.size()))
          .With("bytes", absl::StrCat(bytes_read_, "/", total_bytes()))
          .With("seconds", absl::StrFormat("%.1f", absl::ToDoubleSeconds(now - load_started_)))
      << (final ? "weights loaded" : "loading weights");
}

absl::StatusOr<ResidentDType> ParseResidentDType(absl::string_view name) {
  if (name == "checkpoint") return ResidentDType::kCheckpoint;
  if (name == "fp32") return ResidentDType::kFloat32;
  return absl::InvalidArgumentError(
      absl::StrCat("weights dtype '", name, "': expected checkpoint or fp32"));
}

absl::StatusOr<Matrix> Checkpoint::LoadMatrix(const std::string& name, int64_t rows, int64_t cols,
                                              ResidentDType resident) {
  Matrix m;
  m.rows = rows;
  m.cols = cols;
  if (resident == ResidentDType::kCheckpoint) {
    SPLITMOE_ASSIGN_OR_RETURN(Located loc, Locate(name));
    const TensorInfo& info = *loc.info;
    const bool narrow = info.dtype == DType::kBF16 || info.dtype == DType::kF8E4M3;
    if (narrow && info.shape == std::vector<int64_t>{rows, cols}) {
      const std::string& path = loc.file->path();
      if (info.dtype == DType::kF8E4M3) {
        SPLITMOE_ASSIGN_OR_RETURN(m.scale_inv, LoadScales(name, path, rows, cols));
        m.dtype = WeightDType::kFp8E4M3;
      } else {
        if (Has(name + "_scale_inv")) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": tensor '", name, "' is BF16 but has a '", name,
                           "_scale_inv' (only F8_E4M3 weights are scaled)"));
        }
        m.dtype = WeightDType::kBFloat16;
      }
      m.raw = loc.file->Data(info).data();
      m.keep = loc.file;  // the mapping lives as long as any weight viewing it
      bytes_read_ += info.nbytes;
      consumed_.insert(name);
      LogProgress();
      return m;
    }
    // Other dtypes (F32, F16) and shape errors take the fp32 path, which reports them.
  }
  SPLITMOE_ASSIGN_OR_RETURN(m.data, LoadFloat(name, {rows, cols}));
  return m;
}

absl::StatusOr<std::vector<float>> Checkpoint::LoadVector(const std::string& name, int64_t size) {
  return LoadFloat(name, {size});
}

}  // namespace splitmoe::model
