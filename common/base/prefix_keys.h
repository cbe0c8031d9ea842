// PrefixKeys: the keys of a token sequence's whole blocks for a block-granular prefix cache —
// block i holds tokens [i * T, (i + 1) * T), and its key hashes them together with the key of the
// block before it, so equal keys mean equal prefixes (up to a 64-bit hash: a cache verifies the
// tokens before sharing). The decode worker's cache (decode/paged_latent_cache.h) keys its
// blocks with it and the router guesses with it which decode worker holds a prompt's prefix.
// Pure; any thread.
//
//   std::vector<uint64_t> keys = PrefixKeys(prompt, /*block_tokens=*/64);  // size() / 64 keys
#ifndef SPLITMOE_COMMON_BASE_PREFIX_KEYS_H_
#define SPLITMOE_COMMON_BASE_PREFIX_KEYS_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "common/base/mix64.h"

namespace splitmoe {

// Never 0 (0 means "no key").
inline std::vector<uint64_t> PrefixKeys(absl::Span<const int32_t> tokens, int64_t block_tokens) {
  std::vector<uint64_t> keys;
  if (block_tokens <= 0) return keys;
  const auto t = static_cast<size_t>(block_tokens);
  uint64_t parent = 0;
  for (size_t begin = 0; begin + t <= tokens.size(); begin += t) {
    uint64_t h = Mix64(parent ^ 0x6a09e667f3bcc909ULL);
    for (size_t i = begin; i < begin + t; ++i) h = Mix64(h ^ static_cast<uint32_t>(tokens[i]));
    if (h == 0) h = 1;
    keys.push_back(h);
    parent = h;
  }
  return keys;
}

}  // namespace splitmoe

#endif  // SPLITMOE_COMMON_BASE_PREFIX_KEYS_H_
