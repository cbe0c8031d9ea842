// LatentShipper: a prefill worker's writer into one decode worker's paged latent cache. After
// the Transformer finishes a layer of a prompt chunk (its on_layer_done hook), ShipLayer copies
// that layer's new rows out of the local cache (SequenceCache::ReadRows: from a GPU's pool, a
// copy to the host, the staged path; converted to bf16 when the remote cache stores bf16)
// and puts them into the reserved blocks — one put per block slab touched — while the next
// layer computes. Finish() flushes (every put has landed in the target's memory) and reports the
// first error; only then may the decode worker be told to start. Only latents cross:
// bytes_put() == layers x tokens x latent_dim x dtype bytes. Used from the prefill worker's
// thread; the transport's callbacks only touch the shipper's own counters under its mutex.
//
//   LatentShipper shipper(transport, peer, remote_region, layout, reservation.blocks);
//   model.Forward(batch, form, &hidden, [&](int64_t layer) { shipper.ShipLayer(cache, layer, 0, n);
//   }); SPLITMOE_RETURN_IF_ERROR(shipper.Finish());
#ifndef SPLITMOE_PREFILL_LATENT_SHIPPER_H_
#define SPLITMOE_PREFILL_LATENT_SHIPPER_H_

#include <condition_variable>
#include <cstdint>
#include <list>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "common/engine/latent_cache.h"
#include "common/transfer/region_descriptor.h"
#include "common/transfer/ucx_transport.h"
#include "decode/paged_latent_cache.h"

namespace splitmoe::prefill {

class LatentShipper {
 public:
  LatentShipper(transfer::UcxTransport* transport, transfer::PeerId peer,
                transfer::RegionDescriptor remote, decode::PagedLatentLayout layout,
                std::vector<decode::BlockId> blocks)
      : transport_(transport),
        peer_(peer),
        remote_(std::move(remote)),
        layout_(layout),
        blocks_(std::move(blocks)) {}
  ~LatentShipper();

  // Puts rows [first, first + count) of `layer` (token positions of the sequence) from `cache`,
  // into the remote layer `remote_layer` (-1: the same; the MTP module's one-layer cache goes
  // to the layer after the model's). Returns an error when the rows cannot be read out of the
  // cache (the pass should stop); puts report theirs at Finish().
  absl::Status ShipLayer(engine::SequenceCache& cache, int64_t layer, int64_t first,
                         int64_t count, int64_t remote_layer = -1);
  // Flushes and waits for every put; the first error of any put or the flush.
  absl::Status Finish();

  uint64_t bytes_put() const;

 private:
  void Done(absl::Status status);

  transfer::UcxTransport* transport_;
  transfer::PeerId peer_;
  transfer::RegionDescriptor remote_;
  decode::PagedLatentLayout layout_;
  std::vector<decode::BlockId> blocks_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::list<std::vector<uint8_t>> staging_;  // kept alive until Finish(): puts read from them
  std::vector<float> rows_;                   // ShipLayer's rows read out of the cache
  int64_t in_flight_ = 0;
  absl::Status first_error_;
  uint64_t bytes_put_ = 0;
  bool unflushed_ = false;
};

}  // namespace splitmoe::prefill

#endif  // SPLITMOE_PREFILL_LATENT_SHIPPER_H_
