#!/usr/bin/env bash
# Builds the GPU tests and benchmark here (build-gpu/, Release, CUDA arch ${ARCH:-90}) and packs
# them, with every non-CUDA shared library they load, into gpu-bundle/ — a folder that runs on a
# machine with only a CUDA toolkit and driver (a lent GPU machine is bare: no Debian packages,
# no network):
#
#   gpu-bundle/gpu-check.sh         the checks (scripts/gpu-check.sh, bundle mode)
#   gpu-bundle/payload.tar.xz       bin/ (the test and bench binaries), lib/ (oneDNN, OpenBLAS,
#                                   Abseil, libstdc++, libgomp, ...), third_party/tokenizer (the
#                                   real DeepSeek-V3 tokenizer files some test models use)
#
# The device machine's CUDA runtime and cuBLAS come from its toolkit, glibc from its system; all
# else travels. xz keeps the bundle under the 64 MiB a device call carries (the libraries are
# ~80 MB unpacked). Then it checks the bundle here in a clean environment: a mount namespace in
# which the system library folder holds only glibc, so a library the bundle forgot fails here.
#   ./scripts/gpu-bundle.sh          # build, pack, check
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu}
BUNDLE=${BUNDLE:-gpu-bundle}
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90}" -DSPLITMOE_ENABLE_CUDA=ON
fi
cmake --build "$BUILD_DIR" -j "${SPLITMOE_JOBS:-2}" --target cuda_ops_test ops_test gpu_engine_test gpu_experts_test device_arena_test cuda_bench

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib" "$stage/third_party"
for b in tests/cuda_ops_test tests/ops_test tests/gpu_engine_test tests/gpu_experts_test \
  tests/device_arena_test bench/cuda_bench; do
  cp "$BUILD_DIR/$b" "$stage/bin/"
  strip --strip-debug "$stage/bin/$(basename "$b")"
done
# Every library the binaries resolve here, except glibc's own and the CUDA toolkit's.
glibc='^(libc|libm|libdl|libpthread|librt|ld-linux-x86-64|linux-vdso)\.so'
for b in "$stage"/bin/*; do
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ "$name" =~ $glibc ]] || [[ "$path" == *cuda* ]]; then continue; fi
  cp -L "$path" "$stage/lib/$name"
done
# Test models that need the real tokenizer read it from $SPLITMOE_SOURCE_DIR/third_party.
if [ -d third_party/tokenizer ]; then cp -r third_party/tokenizer "$stage/third_party/"; fi

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE"
tar -C "$stage" -cJf "$BUNDLE/payload.tar.xz" bin lib third_party
cp scripts/gpu-check.sh "$BUNDLE/gpu-check.sh"
bytes=$(du -cb "$BUNDLE" | tail -1 | cut -f1)
echo "bundle: $BUNDLE $((bytes / 1024 / 1024)) MiB packed, $(du -sh "$stage" | cut -f1) unpacked"
if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
  echo "bundle exceeds 64 MiB" >&2
  exit 1
fi

# The clean-environment check: unpack, then run every binary with the system library folder
# replaced by one that holds only glibc (plus what the CUDA toolkit's folder has): any library
# the bundle lacks fails to load here.
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
  check=$(mktemp -d)
  tar -C "$check" -xJf "$BUNDLE/payload.tar.xz"
  bare=$(mktemp -d)
  for f in /lib/x86_64-linux-gnu/{libc.so.6,libm.so.6,libdl.so.2,libpthread.so.0,librt.so.1,ld-linux-x86-64.so.2}; do
    cp -L "$f" "$bare/"
  done
  unshare -m bash -c "
    mount --bind '$bare' /lib/x86_64-linux-gnu
    export LD_LIBRARY_PATH='$check/lib' SPLITMOE_SOURCE_DIR='$check'
    ok=0
    for b in '$check'/bin/*; do
      name=\${b##*/}
      # The loader itself lists what it resolves: nothing may be missing. (Only bash builtins
      # here: grep and tail need libraries the bare folder hides.)
      deps=\$(LD_TRACE_LOADED_OBJECTS=1 \"\$b\" 2>&1)
      if [[ \"\$deps\" == *'not found'* ]]; then
        echo \"clean environment: \$name lacks:\" >&2
        echo \"\$deps\" >&2
        ok=1
        continue
      fi
      # The tests run too: without a device their GPU cases skip, the rest must pass.
      case \$name in
        *_test)
          if \"\$b\" >/dev/null 2>&1; then
            echo \"clean environment: \$name loads and runs (GPU cases skipped here)\"
          else
            echo \"clean environment: \$name fails:\" >&2
            \"\$b\" >&2 2>&1
            ok=1
          fi ;;
        *) echo \"clean environment: \$name loads\" ;;
      esac
    done
    exit \$ok"
  rm -rf "$check" "$bare"
else
  echo "clean-environment check skipped: needs root and unshare" >&2
fi
