#include "common/transfer/region_descriptor.h"

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace splitmoe::transfer {
namespace {

constexpr char kMagic[4] = {'S', 'M', 'R', 'D'};
constexpr uint32_t kVersion = 1;
// Worker addresses are ~100-300 bytes and rkeys ~10-100; anything near this is corrupt input.
constexpr uint32_t kMaxFieldBytes = 1 << 16;

template <typename T>
void AppendInt(std::string& out, T value) {
  char buf[sizeof(T)];
  for (size_t i = 0; i < sizeof(T); ++i) buf[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  out.append(buf, sizeof(T));
}

// Reads little-endian integers and length-prefixed strings from the front of `in_`.
class Reader {
 public:
  explicit Reader(absl::string_view in) : in_(in) {}

  template <typename T>
  bool ReadInt(T& value) {
    if (in_.size() < sizeof(T)) return false;
    value = 0;
    for (size_t i = 0; i < sizeof(T); ++i) {
      value |= static_cast<T>(static_cast<unsigned char>(in_[i])) << (8 * i);
    }
    in_.remove_prefix(sizeof(T));
    return true;
  }

  bool ReadBytes(std::string& value) {
    uint32_t len = 0;
    if (!ReadInt(len) || len > kMaxFieldBytes || in_.size() < len) return false;
    value.assign(in_.data(), len);
    in_.remove_prefix(len);
    return true;
  }

  bool empty() const { return in_.empty(); }

 private:
  absl::string_view in_;
};

}  // namespace

std::string RegionDescriptor::Serialize() const {
  std::string out;
  out.reserve(4 + 4 + 8 + 8 + 4 + worker_address.size() + 4 + rkey.size());
  out.append(kMagic, sizeof(kMagic));
  AppendInt<uint32_t>(out, kVersion);
  AppendInt<uint64_t>(out, remote_addr);
  AppendInt<uint64_t>(out, size_bytes);
  AppendInt<uint32_t>(out, static_cast<uint32_t>(worker_address.size()));
  out.append(worker_address);
  AppendInt<uint32_t>(out, static_cast<uint32_t>(rkey.size()));
  out.append(rkey);
  return out;
}

absl::StatusOr<RegionDescriptor> RegionDescriptor::Parse(absl::string_view bytes) {
  if (bytes.size() < sizeof(kMagic) || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::InvalidArgumentError("region descriptor: bad magic");
  }
  Reader reader(bytes.substr(sizeof(kMagic)));
  uint32_t version = 0;
  if (!reader.ReadInt(version)) return absl::InvalidArgumentError("region descriptor: truncated");
  if (version != kVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("region descriptor: unsupported version ", version));
  }
  RegionDescriptor d;
  if (!reader.ReadInt(d.remote_addr) || !reader.ReadInt(d.size_bytes) ||
      !reader.ReadBytes(d.worker_address) || !reader.ReadBytes(d.rkey)) {
    return absl::InvalidArgumentError("region descriptor: truncated or oversized field");
  }
  if (!reader.empty()) return absl::InvalidArgumentError("region descriptor: trailing bytes");
  if (d.remote_addr + d.size_bytes < d.remote_addr) {
    return absl::InvalidArgumentError("region descriptor: address range wraps around");
  }
  return d;
}

}  // namespace splitmoe::transfer
