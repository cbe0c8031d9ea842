#include "common/transfer/region_descriptor.h"

#include <string>

#include "gtest/gtest.h"

namespace splitmoe::transfer {
namespace {

RegionDescriptor Sample() {
  RegionDescriptor d;
  d.worker_address = std::string("\x00\x01worker\xff", 9);
  d.remote_addr = 0x7f12'3456'7000;
  d.size_bytes = 64 << 20;
  d.rkey = std::string("\x05\x00rkey", 6);
  return d;
}

TEST(RegionDescriptorTest, RoundTrips) {
  const RegionDescriptor d = Sample();
  absl::StatusOr<RegionDescriptor> parsed = RegionDescriptor::Parse(d.Serialize());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->worker_address, d.worker_address);
  EXPECT_EQ(parsed->remote_addr, d.remote_addr);
  EXPECT_EQ(parsed->size_bytes, d.size_bytes);
  EXPECT_EQ(parsed->rkey, d.rkey);
}

TEST(RegionDescriptorTest, RefusesEveryTruncation) {
  const std::string wire = Sample().Serialize();
  for (size_t n = 0; n < wire.size(); ++n) {
    absl::StatusOr<RegionDescriptor> parsed = RegionDescriptor::Parse(wire.substr(0, n));
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << "length " << n;
  }
}

TEST(RegionDescriptorTest, RefusesBadMagicVersionTrailingBytesAndWrap) {
  std::string wire = Sample().Serialize();
  std::string bad_magic = wire;
  bad_magic[0] = 'X';
  EXPECT_EQ(RegionDescriptor::Parse(bad_magic).status().code(), absl::StatusCode::kInvalidArgument);
  std::string bad_version = wire;
  bad_version[4] = 9;
  EXPECT_EQ(RegionDescriptor::Parse(bad_version).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RegionDescriptor::Parse(wire + "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  RegionDescriptor wraps = Sample();
  wraps.remote_addr = ~uint64_t{0} - 10;
  EXPECT_EQ(RegionDescriptor::Parse(wraps.Serialize()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace splitmoe::transfer
