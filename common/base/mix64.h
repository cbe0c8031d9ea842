// Mix64: the SplitMix64 finaliser, a bijective 64-bit mixer. The project's counter-based random
// numbers are built from it (tiny-model weights keyed by (seed, tensor, index); sampling keyed by
// (seed, position)) so they are identical on every machine and every process. Pure; any thread.
//
//   double u = static_cast<double>(Mix64(seed ^ Mix64(counter)) >> 11) * 0x1.0p-53;  // [0, 1)
#ifndef SPLITMOE_COMMON_BASE_MIX64_H_
#define SPLITMOE_COMMON_BASE_MIX64_H_

#include <cstdint>

namespace splitmoe {

constexpr uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace splitmoe

#endif  // SPLITMOE_COMMON_BASE_MIX64_H_
