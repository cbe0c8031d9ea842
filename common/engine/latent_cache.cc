#include "common/engine/latent_cache.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace splitmoe::engine {

absl::Status SequenceCache::Store(const kernels::Device& device, int64_t layer, int64_t start,
                                  const float* rows, int64_t n) {
  if (device.backend != kernels::Backend::kCpu) {
    return absl::FailedPreconditionError(
        absl::StrCat("a host latent cache cannot store rows from ", kernels::DeviceName(device),
                     ": a Transformer on a device needs its caches in that device's pool"));
  }
  if (start < 0 || n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(n, " latent rows stored from position ", start));
  }
  const int64_t dim = latent_dim();
  for (int64_t i = 0; i < n; ++i) {
    float* row = Row(layer, start + i);
    if (row == nullptr) return absl::InternalError("a host latent cache without host rows");
    std::memcpy(row, rows + i * dim, static_cast<size_t>(dim) * sizeof(float));
  }
  RowsWritten(layer);
  return absl::OkStatus();
}

absl::Status SequenceCache::ReadRows(int64_t layer, int64_t first, int64_t n, float* out) {
  if (first < 0 || n < 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " latent rows read from position ", first));
  }
  const int64_t dim = latent_dim();
  for (int64_t i = 0; i < n; ++i) {
    const float* row = Row(layer, first + i);
    if (row == nullptr) return absl::InternalError("a host latent cache without host rows");
    std::memcpy(out + i * dim, row, static_cast<size_t>(dim) * sizeof(float));
  }
  return absl::OkStatus();
}

}  // namespace splitmoe::engine
