// DeviceArena: the decode worker's latent cache in a device's memory, for a decode worker whose
// forward pass runs there (`decode --device cuda:N`). It is a copy of the host arena
// (PagedLatentCache) with the same layout and dtype, byte for byte: block b, layer l is at the
// same offset in both. So a device's attention reads each layer of the blocks in place as a
// strided pool (kernels::MlaAttentionParams::pool_block_stride: every layer of a block
// together, as the host arena keeps them), and one copy moves a whole block.
//
// The host arena stays the one prefill workers put into over UCX: Debian's UCX has no CUDA
// transport, so the latents are staged through host memory, page-locked here when the device
// allows (pinned(); `status` reports which). Both copies hold every row of a running sequence:
//   - a sequence's prompt rows arrive in the host arena; its first step copies them to the
//     device, whole blocks from the first one its prefix did not share (a shared block's rows
//     are on the device already: written there by the sequence that published it);
//   - the decode steps store each new row on the device and copy the same bytes back into the
//     host arena (write-through, enqueued on the stream; the step ends synchronized), so a
//     published block's host rows are complete for a prefill worker that reads a cached prefix
//     from there. A sequence stopped before its first step has no rows on the device, and the
//     decode worker publishes none of its blocks.
// The bookkeeping (blocks, generations, the prefix cache) stays the PagedLatentCache's: the
// device copy has none of its own.
//
// DeviceSequenceCache is one sequence's view for a Transformer on the device. Its copies run on
// the thread of the step that uses it (the decode actor's executor), never on the actor's.
//
//   SPLITMOE_ASSIGN_OR_RETURN(auto arena, DeviceArena::Create(device, cache.layout(),
//                                 cache.arena_base(), cache.num_blocks()));
//   auto upload = DeviceArena::UploadFrom(cached_tokens, prompt_tokens);
//   auto view = arena->View(&cache, id, prompt_tokens, /*layer_offset=*/0, upload);
#ifndef SPLITMOE_DECODE_DEVICE_ARENA_H_
#define SPLITMOE_DECODE_DEVICE_ARENA_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/engine/pooled_latent_cache.h"
#include "common/kernels/ops.h"
#include "decode/paged_latent_cache.h"
#include "decode/paged_sequence_cache.h"

namespace splitmoe::decode {

// The prompt rows [first_token, end_token) a sequence's first step copies to the device, once,
// for its main view and its MTP view together (whole blocks, every layer).
struct PendingUpload {
  int64_t first_token = 0;
  int64_t end_token = 0;
  // Set by the step that copied them; read by the actor once that step is done.
  std::atomic<bool> done{false};
};

class DeviceSequenceCache;

class DeviceArena {
 public:
  // A device copy of the host arena at `host` (num_blocks blocks of `layout`), zero-filled.
  // The host arena must outlive this; it is page-locked for the copies when the device allows
  // (else a warning, and the copies go through pageable memory).
  static absl::StatusOr<std::unique_ptr<DeviceArena>> Create(const kernels::Device& device,
                                                             const PagedLatentLayout& layout,
                                                             uint8_t* host, int64_t num_blocks);
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  static std::shared_ptr<PendingUpload> UploadFrom(int64_t first_token, int64_t end_token) {
    auto upload = std::make_shared<PendingUpload>();
    upload->first_token = first_token;
    upload->end_token = end_token;
    return upload;
  }
  // Sequence `id`'s view (of `cache`, whose arena this copies), as PagedSequenceCache's
  // arguments; `upload` names the rows its first Reserve copies (shared with the sequence's
  // other view).
  std::unique_ptr<DeviceSequenceCache> View(PagedLatentCache* cache, SequenceId id,
                                            int64_t stored_tokens, int64_t layer_offset,
                                            std::shared_ptr<PendingUpload> upload);

  const kernels::Device& device() const { return device_; }
  const PagedLatentLayout& layout() const { return layout_; }
  int64_t num_blocks() const { return num_blocks_; }
  uint64_t bytes() const { return buffer_.bytes(); }
  bool pinned() const { return pinned_; }
  // Device address of `host` (a pointer into the host arena): the same offset.
  const uint8_t* DeviceAddress(const uint8_t* host) const {
    return device_base() + (host - host_);
  }
  uint8_t* device_base() const { return buffer_.as<uint8_t>(); }
  // How prompt latents reach the device, for `status`: "staged through pinned host memory into
  // cuda:0".
  std::string Describe() const;

  // Whole blocks of `table` holding rows [first_token, end_token), every layer, host to device
  // (consecutive block ids in one copy).
  absl::Status UploadBlocks(const BlockTable& table, int64_t first_token, int64_t end_token);
  // Rows [first, first + n) of `layer` (an arena layer), device to host or host to device, as
  // bytes (both copies hold the same dtype).
  absl::Status CopyRows(const BlockTable& table, int64_t layer, int64_t first, int64_t n,
                        bool to_host);
  // Both are enqueued on the device's stream (kernels::CopyToDeviceAsync): the device's later
  // work sees them; the host sees copies to it once the device is synchronized, which the decode
  // worker does at the end of every step, before its blocks can change hands.

 private:
  DeviceArena(const kernels::Device& device, const PagedLatentLayout& layout, uint8_t* host,
              int64_t num_blocks)
      : device_(device), layout_(layout), host_(host), num_blocks_(num_blocks) {}

  kernels::Device device_;
  PagedLatentLayout layout_;
  uint8_t* host_;
  int64_t num_blocks_;
  kernels::DeviceBuffer buffer_;
  bool pinned_ = false;
};

class DeviceSequenceCache : public PagedSequenceCache {
 public:
  DeviceSequenceCache(DeviceArena* arena, PagedLatentCache* cache, SequenceId id,
                      int64_t stored_tokens, int64_t layer_offset,
                      std::shared_ptr<PendingUpload> upload)
      : PagedSequenceCache(cache, id, stored_tokens, layer_offset),
        arena_(arena),
        upload_(std::move(upload)) {}

  // The host table's room (PagedSequenceCache), then, once, the prompt's rows to the device, and
  // the block table to the device whenever it grew.
  absl::Status Reserve(int64_t tokens) override;
  // Null: rows are stored on the device (Store).
  float* Row(int64_t layer, int64_t position) override { return nullptr; }
  void RowsWritten(int64_t layer) override {}
  // Stores the rows on the device, then copies their bytes into the host arena.
  absl::Status Store(const kernels::Device& device, int64_t layer, int64_t start,
                     const float* rows, int64_t n) override;
  // From the host arena, which holds every row the device does (once synchronized: this waits).
  absl::Status ReadRows(int64_t layer, int64_t first, int64_t n, float* out) override;
  // Into the host arena, then the same bytes to the device.
  absl::Status WriteRows(int64_t layer, int64_t first, const float* rows, int64_t n) override;
  // The blocks in the device's copy.
  kernels::LatentBlocks View(int64_t layer, int64_t keys) override;
  PoolRef Pool(int64_t layer) const override;
  // On the CPU, the host arena's rows; on a device, null (the absorbed form reads View).
  const float* LayerRows(int64_t layer, int64_t keys) override;

 private:
  DeviceArena* arena_;
  std::shared_ptr<PendingUpload> upload_;
  engine::DeviceBlockTable table_;  // the host table's blocks, on the device
};

}  // namespace splitmoe::decode

#endif  // SPLITMOE_DECODE_DEVICE_ARENA_H_
