#!/usr/bin/env bash
# Runs every test: installs what is missing, builds, runs ctest (all labels), then builds the
# same tree with AddressSanitizer + UndefinedBehaviorSanitizer into build-asan/ and runs the
# tests again there, then runs each libFuzzer target briefly (scripts/fuzz.sh, clang, build-fuzz/).
# Idempotent; a second run only rebuilds what changed.
#   CTEST_ARGS="-L unit" ./scripts/test.sh      # a subset
#   SPLITMOE_SANITIZE=0 ./scripts/test.sh       # skip the sanitizer pass
#   SPLITMOE_FUZZ=0 ./scripts/test.sh           # skip the fuzzing pass (docs/fuzzing.md)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
# As in build.sh: ccache keys relative to the checkout (the sanitizer build below uses it too).
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
# shellcheck disable=SC2086
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure -j 2 ${CTEST_ARGS:-})

if [ "${SPLITMOE_SANITIZE:-1}" != "0" ]; then
  if [ ! -f build-asan/build.ninja ]; then
    cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSPLITMOE_ENABLE_CUDA=OFF \
      -DCMAKE_CXX_FLAGS="-O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
      -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
  fi
  cmake --build build-asan -j "${SPLITMOE_JOBS:-2}"
  # The benchmark smoke runs are timing, not correctness, and the chaos soak is a long run of
  # the same code the e2e tests cover: neither is repeated under the sanitizers.
  # Leaks inside third-party libraries only are suppressed (scripts/lsan.supp says which and why).
  # shellcheck disable=SC2086
  (cd build-asan && LSAN_OPTIONS="suppressions=$PWD/../scripts/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}" \
     ctest --output-on-failure -j 2 -LE "bench|soak" ${CTEST_ARGS:-})
fi

# Each libFuzzer target for a short while over its seed corpus (scripts/fuzz.sh; longer campaigns
# in docs/fuzzing.md).
if [ "${SPLITMOE_FUZZ:-1}" != "0" ]; then
  ./scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
fi
