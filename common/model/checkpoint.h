// Checkpoint: a model directory in the Hugging Face layout — config.json plus either
// model.safetensors or shards listed by model.safetensors.index.json. Shards are opened (header
// parsed, file memory-mapped) only when one of their tensors is asked for, so loading a subset
// of layers or experts never touches the other shards. Not thread-safe while loading (the lazy
// shard table); load from one thread, then share the resulting weights.
//
// Weights can stay in their checkpoint dtype (ResidentDType::kCheckpoint): a BF16 or FP8 matrix is
// then a view of the mapped file (Matrix::raw), which it keeps mapped after the Checkpoint goes.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir));
//   SPLITMOE_ASSIGN_OR_RETURN(Matrix wo, ckpt->LoadMatrix("model.layers.0.self_attn.o_proj.weight",
//                                                         hidden, heads * v_head_dim));
#ifndef SPLITMOE_COMMON_MODEL_CHECKPOINT_H_
#define SPLITMOE_COMMON_MODEL_CHECKPOINT_H_

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/strings/string_view.h"
#include "common/model/config.h"
#include "common/model/safetensors.h"
#include "common/model/tensor.h"

namespace splitmoe::model {

// model.safetensors.index.json maps each of a large checkpoint's ~100k tensor names to a shard
// (DeepSeek-V3's is ~9 MB); anything larger is not one.
inline constexpr uint64_t kMaxIndexJsonBytes = 256 << 20;

// The safetensors files of a model directory, sorted by name: the shards the index names when
// model.safetensors.index.json exists, else every *.safetensors file in the directory. Reads the
// index only (never a shard).
absl::StatusOr<std::vector<std::string>> WeightFileNames(const std::string& dir);

// How a loaded weight matrix is held: widened to fp32 (the reference mode, and what oneDNN
// packs), or in the checkpoint's own dtype where the kernels read it (BF16, FP8 E4M3; other
// dtypes are widened to fp32 either way).
enum class ResidentDType { kCheckpoint, kFloat32 };
absl::StatusOr<ResidentDType> ParseResidentDType(absl::string_view name);  // "checkpoint", "fp32"

class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  // Every tensor name the checkpoint declares (the index's weight_map, or the single file's
  // header).
  const std::vector<std::string>& tensor_names() const { return names_; }
  bool Has(absl::string_view name) const;

  // Loads a weight as fp32 after checking its shape; FP8 weights are dequantised with their
  // `<name>_scale_inv` block scales. Errors name the file and the tensor.
  // With kCheckpoint, BF16 and FP8 weights stay in their dtype (a view of the mapped file).
  absl::StatusOr<Matrix> LoadMatrix(const std::string& name, int64_t rows, int64_t cols,
                                    ResidentDType resident = ResidentDType::kFloat32);
  absl::StatusOr<std::vector<float>> LoadVector(const std::string& name, int64_t size);

  // Names that were loaded (with their scales); used to find tensors nobody asked for.
  const std::set<std::string>& consumed() const { return consumed_; }
  // Bytes of tensor data touched so far (what a subset load really reads).
  uint64_t bytes_read() const { return bytes_read_; }
  // Number of shard files opened so far.
  size_t files_opened() const { return files_.size(); }
  // Bytes of the checkpoint's weight files (the total bytes_read() is a part of).
  uint64_t total_bytes() const;
  // Logs how much is loaded so far (tensors and bytes, of the checkpoint's), at most every 2 s
  // unless `final`; long loads say where they are.
  void LogProgress(bool final = false);

 private:
  struct Located {
    std::shared_ptr<const SafetensorsFile> file;
    const TensorInfo* info;
  };
  absl::StatusOr<Located> Locate(const std::string& name);
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> OpenFile(const std::string& file_name);
  absl::StatusOr<std::vector<float>> LoadFloat(const std::string& name,
                                               const std::vector<int64_t>& shape);
  // The fp32 block scales of FP8 weight `name` [rows, cols] (checked, marked consumed).
  absl::StatusOr<std::vector<float>> LoadScales(const std::string& name, const std::string& path,
                                                int64_t rows, int64_t cols);

  std::string dir_;
  ModelConfig config_;
  std::map<std::string, std::string, std::less<>> weight_map_;  // tensor -> file name
  std::vector<std::string> names_;
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> files_;
  std::set<std::string> consumed_;
  uint64_t bytes_read_ = 0;
  absl::Time load_started_ = absl::Now();
  absl::Time last_progress_ = absl::Now();
  mutable uint64_t total_bytes_ = 0;  // computed on first use
};

}  // namespace splitmoe::model

#endif  // SPLITMOE_COMMON_MODEL_CHECKPOINT_H_
