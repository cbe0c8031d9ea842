#include "prefill/latent_shipper.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/model/numeric.h"

namespace splitmoe::prefill {

LatentShipper::~LatentShipper() {
  bool pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending = unflushed_ || in_flight_ > 0;
  }
  if (pending) (void)Finish();  // never leave a put reading freed staging memory
}

void LatentShipper::Done(absl::Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!status.ok() && first_error_.ok()) first_error_ = status;
  --in_flight_;
  cv_.notify_all();
}

absl::Status LatentShipper::ShipLayer(engine::SequenceCache& cache, int64_t layer,
                                      int64_t first, int64_t count, int64_t remote_layer) {
  if (remote_layer < 0) remote_layer = layer;
  const int64_t dim = layout_.latent_dim, block = layout_.block_tokens,
                vbytes = layout_.value_bytes();
  int64_t position = first;
  const int64_t end = first + count;
  while (position < end) {
    const int64_t block_index = position / block, slot = position % block;
    const int64_t n = std::min(end - position, block - slot);  // rows that fit in this block
    if (block_index >= static_cast<int64_t>(blocks_.size()) || remote_layer >= layout_.num_layers) {
      std::lock_guard<std::mutex> lock(mu_);
      if (first_error_.ok()) {
        first_error_ = absl::OutOfRangeError(absl::StrCat(
            "position ", position, " of layer ", remote_layer, " lies beyond the ",
            blocks_.size(), " reserved blocks of ", layout_.num_layers, " layers"));
      }
      return absl::OkStatus();  // Finish() reports it; the other prompts' puts go on
    }
    std::vector<uint8_t> staged(static_cast<size_t>(n * dim * vbytes));
    // The rows as fp32 on the host, wherever the cache keeps them (a device's: copied out).
    rows_.resize(static_cast<size_t>(n * dim));
    if (absl::Status read = cache.ReadRows(layer, position, n, rows_.data()); !read.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      if (first_error_.ok()) first_error_ = read;
      return read;
    }
    for (int64_t r = 0; r < n; ++r) {
      const float* row = rows_.data() + r * dim;
      uint8_t* out = staged.data() + r * dim * vbytes;
      if (layout_.dtype == decode::LatentDType::kBFloat16) {
        for (int64_t v = 0; v < dim; ++v) {
          const uint16_t b = model::FloatToBf16(row[v]);
          std::memcpy(out + 2 * v, &b, 2);
        }
      } else {
        std::memcpy(out, row, static_cast<size_t>(dim) * sizeof(float));
      }
    }
    const uint64_t offset =
        static_cast<uint64_t>(layout_.RowOffset(blocks_[block_index], remote_layer, slot));
    const void* data;
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      staging_.push_back(std::move(staged));
      data = staging_.back().data();
      bytes = staging_.back().size();
      ++in_flight_;
      bytes_put_ += bytes;
      unflushed_ = true;
    }
    transport_->Put(peer_, data, bytes, remote_, offset,
                    [this](absl::Status s) { Done(std::move(s)); });
    position += n;
  }
  return absl::OkStatus();
}

absl::Status LatentShipper::Finish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++in_flight_;
    unflushed_ = false;
  }
  transport_->Flush(peer_, [this](absl::Status s) { Done(std::move(s)); });
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return in_flight_ == 0; });
  staging_.clear();
  return first_error_;
}

uint64_t LatentShipper::bytes_put() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_put_;
}

}  // namespace splitmoe::prefill
