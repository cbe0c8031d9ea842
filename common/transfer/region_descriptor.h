// RegionDescriptor: what a peer needs to write into one of this process's registered regions —
// the owning worker's UCX address, the region's base address and size in the owner's address
// space, and the packed remote key. Decode workers describe their latent cache once and ship the
// bytes to prefill workers (over gRPC); prefill workers parse them and put into them.
//
// Plain value type; no UCX dependency, safe on any thread.
//
//   std::string wire = transport->Describe(region).Serialize();
//   SPLITMOE_ASSIGN_OR_RETURN(RegionDescriptor remote, RegionDescriptor::Parse(wire));
#ifndef SPLITMOE_COMMON_TRANSFER_REGION_DESCRIPTOR_H_
#define SPLITMOE_COMMON_TRANSFER_REGION_DESCRIPTOR_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace splitmoe::transfer {

struct RegionDescriptor {
  std::string worker_address;  // opaque UCX worker address of the region's owner
  uint64_t remote_addr = 0;    // base of the region in the owner's address space
  uint64_t size_bytes = 0;
  std::string rkey;  // packed UCX remote key; opaque

  // Versioned little-endian encoding: "SMRD", u32 version, u64 addr, u64 size, then the two
  // byte strings each prefixed with a u32 length.
  std::string Serialize() const;
  // InvalidArgument on a wrong magic or version, truncation, trailing bytes or absurd lengths.
  static absl::StatusOr<RegionDescriptor> Parse(absl::string_view bytes);
};

}  // namespace splitmoe::transfer

#endif  // SPLITMOE_COMMON_TRANSFER_REGION_DESCRIPTOR_H_
