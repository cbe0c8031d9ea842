#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU, in one run: builds the CUDA kernels, their tests
# and the GPU benchmark (build-gpu/), checks every kernel against the CPU path (a skipped case
# fails this script: here the GPU must be there), then times them against the device's own
# measured ceilings. Needs what scripts/setup.sh installs (Debian packages) plus a CUDA toolkit
# and driver. Prints a short table last.
#   ARCH=90 ./scripts/gpu-check.sh        # compute capability to build for (Hopper: 90)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu}
OUT_DIR=${OUT:-$BUILD_DIR/gpu-check}
mkdir -p "$OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi not found"
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90}" -DSPLITMOE_ENABLE_CUDA=ON
fi
# Without a CUDA toolkit the GPU targets do not exist and the build below says so.
cmake --build "$BUILD_DIR" -j "$(nproc)" --target cuda_ops_test gpu_engine_test cuda_bench

echo "== kernels against the CPU path"
status=0
"$BUILD_DIR/tests/cuda_ops_test" 2>&1 | tee "$OUT_DIR/cuda_ops_test.log" || status=1
echo "== the engine on the GPU against the CPU engine"
SPLITMOE_SOURCE_DIR=$PWD SPLITMOE_BINARY_DIR=$BUILD_DIR "$BUILD_DIR/tests/gpu_engine_test" 2>&1 |
  tee "$OUT_DIR/gpu_engine_test.log" || status=1
if grep -q "\[  SKIPPED \]" "$OUT_DIR/cuda_ops_test.log" "$OUT_DIR/gpu_engine_test.log"; then
  echo "GPU checks were skipped: no usable device" >&2
  status=1
fi
echo "== timing"
"$BUILD_DIR/bench/cuda_bench" 2>&1 | tee "$OUT_DIR/cuda_bench.log" || status=1
echo "== summary"
grep -hE "^\[  (PASSED|FAILED) |^\[       OK|^\[  FAILED|fp32 mode|bf16 mode|bench model" \
  "$OUT_DIR/cuda_ops_test.log" "$OUT_DIR/gpu_engine_test.log" || true
grep -E "^\|" "$OUT_DIR/cuda_bench.log" || true
exit $status
