#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU, in one run: checks every kernel against the CPU
# path (a skipped case fails this script: here the GPU must be there), the engine on the GPU
# against the CPU engine, then times the kernels against the device's own measured ceilings.
# Prints a short table last; logs go to $OUT (default: gpu-check/ beside the binaries).
#
# Two ways to run it:
#   - from a bundle (scripts/gpu-bundle.sh made it here): gpu-bundle/gpu-check.sh unpacks
#     payload.tar.xz beside itself and runs its binaries with its own libraries; the machine needs
#     only a CUDA toolkit (cudart, cuBLAS) and a driver: what a lent, bare GPU machine has.
#   - from a checkout with the Debian packages (scripts/setup.sh) and a CUDA toolkit: builds
#     build-gpu/ first. ARCH=90 ./scripts/gpu-check.sh (compute capability; Hopper: 90)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$here/payload.tar.xz" ]; then
  root=${BUNDLE_DIR:-$here/unpacked}
  if [ ! -d "$root/bin" ]; then
    mkdir -p "$root"
    tar -C "$root" -xJf "$here/payload.tar.xz"
  fi
  export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  for cuda in /usr/local/cuda/lib64 /usr/local/cuda/lib; do
    [ -d "$cuda" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$cuda"
  done
  export SPLITMOE_SOURCE_DIR="$root"
  ops="$root/bin/cuda_ops_test" op_interface="$root/bin/ops_test"
  engine_test="$root/bin/gpu_engine_test" bench="$root/bin/cuda_bench"
  experts_test="$root/bin/gpu_experts_test" arena_test="$root/bin/device_arena_test"
  OUT_DIR=${OUT:-$root/gpu-check}
else
  cd "$here/.."
  BUILD_DIR=${BUILD_DIR:-build-gpu}
  if [ ! -f "$BUILD_DIR/build.ninja" ]; then
    cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90}" -DSPLITMOE_ENABLE_CUDA=ON
  fi
  # Without a CUDA toolkit the GPU targets do not exist and the build below says so.
  cmake --build "$BUILD_DIR" -j "$(nproc)" --target cuda_ops_test ops_test gpu_engine_test gpu_experts_test device_arena_test cuda_bench
  export SPLITMOE_SOURCE_DIR=$PWD
  ops="$BUILD_DIR/tests/cuda_ops_test" op_interface="$BUILD_DIR/tests/ops_test"
  engine_test="$BUILD_DIR/tests/gpu_engine_test"
  experts_test="$BUILD_DIR/tests/gpu_experts_test"
  arena_test="$BUILD_DIR/tests/device_arena_test"
  bench="$BUILD_DIR/bench/cuda_bench"
  OUT_DIR=${OUT:-$BUILD_DIR/gpu-check}
fi
mkdir -p "$OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi not found"

echo "== kernels against the CPU path"
status=0
"$ops" 2>&1 | tee "$OUT_DIR/cuda_ops_test.log" || status=1
echo "== the op interface (kernels/ops.h): every op on cuda:0 against the CPU"
"$op_interface" 2>&1 | tee "$OUT_DIR/ops_test.log" || status=1
echo "== the engine on the GPU against the CPU engine"
"$engine_test" 2>&1 |
  tee "$OUT_DIR/gpu_engine_test.log" || status=1
echo "== an expert shard on the GPU (expert --device cuda:N) against the CPU shard"
"$experts_test" 2>&1 | tee "$OUT_DIR/gpu_experts_test.log" || status=1
echo "== the decode worker's path (decode --device cuda:N): its cache's device copy"
"$arena_test" --gtest_filter=DeviceArenaGpuTest.* 2>&1 | tee "$OUT_DIR/device_arena_test.log" ||
  status=1
if grep -q "\[  SKIPPED \]" "$OUT_DIR/cuda_ops_test.log" "$OUT_DIR/ops_test.log" \
  "$OUT_DIR/gpu_engine_test.log" "$OUT_DIR/gpu_experts_test.log" \
  "$OUT_DIR/device_arena_test.log"; then
  echo "GPU checks were skipped: no usable device" >&2
  status=1
fi
echo "== timing"
"$bench" 2>&1 | tee "$OUT_DIR/cuda_bench.log" || status=1
echo "== summary"
grep -hE "^\[  (PASSED|FAILED) |^\[       OK|^\[  FAILED|fp32 mode|bf16 mode|bench model|in norm" \
  "$OUT_DIR/cuda_ops_test.log" "$OUT_DIR/ops_test.log" "$OUT_DIR/gpu_engine_test.log" \
  "$OUT_DIR/gpu_experts_test.log" "$OUT_DIR/device_arena_test.log" || true
grep -E "^\|" "$OUT_DIR/cuda_bench.log" || true
exit $status
