#!/usr/bin/env bash
# Runs every test: installs what is missing, builds, runs ctest (all labels), then builds the
# same tree with AddressSanitizer + UndefinedBehaviorSanitizer into build-asan/ and runs the
# tests again there, then the threaded tests under ThreadSanitizer (build-tsan/), then runs each
# libFuzzer target briefly (scripts/fuzz.sh, clang, build-fuzz/).
# Idempotent; a second run only rebuilds what changed.
#   CTEST_ARGS="-L unit" ./scripts/test.sh      # a subset
#   SPLITMOE_SANITIZE=0 ./scripts/test.sh       # skip the ASan + UBSan pass
#   SPLITMOE_TSAN=0 ./scripts/test.sh           # skip the ThreadSanitizer pass
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
  # The benchmark smoke runs are timing, not correctness, and the chaos soak and the multi-host
  # test (label slow) are long runs of the same code the e2e tests cover: none is repeated under
  # the sanitizers.
  # Leaks inside third-party libraries only are suppressed (scripts/lsan.supp says which and why).
  # shellcheck disable=SC2086
  (cd build-asan && LSAN_OPTIONS="suppressions=$PWD/../scripts/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}" \
     ctest --output-on-failure -j 2 -LE "bench|soak|slow" ${CTEST_ARGS:-})
fi

# ThreadSanitizer on the tests whose threads are ours: the actor runtime (mailboxes, actor
# threads, executors, replies), the engine's overlap helper and ping-pong threads, and the decode
# and expert actors driven by real executors. Tests whose threads meet inside gRPC or UCX are left
# out (prefill_actor_test opens gRPC channels; the e2e tests): Debian's libgrpc and libabsl are
# not instrumented, so TSan cannot see their synchronisation (absl::Mutex, gRPC's completion
# queues) and reports their internals as races. oneDNN's OpenMP pool is uninstrumented too: one
# thread (OMP_NUM_THREADS=1); UCX's memory hooks crash TSan's thread exit (UCX_MEM_EVENTS=no).
TSAN_TESTS=(mailbox_test actor_test manual_scheduler_test reply_test executor_test overlap_test
  batch_decoder_test decode_actor_test experts_actor_test)
if [ "${SPLITMOE_TSAN:-1}" != "0" ]; then
  if [ ! -f build-tsan/build.ninja ]; then
    cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSPLITMOE_ENABLE_CUDA=OFF \
      -DCMAKE_CXX_FLAGS="-O1 -fsanitize=thread -fno-omit-frame-pointer" \
      -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread"
  fi
  cmake --build build-tsan -j "${SPLITMOE_JOBS:-2}" --target "${TSAN_TESTS[@]}"
  tsan_regex="^($(IFS='|'; echo "${TSAN_TESTS[*]}"))\$"
  # shellcheck disable=SC2086
  (cd build-tsan && OMP_NUM_THREADS=1 UCX_MEM_EVENTS=no \
     TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/../scripts/tsan.supp${TSAN_OPTIONS:+ $TSAN_OPTIONS}" \
     ctest --output-on-failure -j 2 -R "$tsan_regex" ${CTEST_ARGS:-})
fi

# Each libFuzzer target for a short while over its seed corpus (scripts/fuzz.sh; longer campaigns
# in docs/fuzzing.md).
if [ "${SPLITMOE_FUZZ:-1}" != "0" ]; then
  ./scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
fi
