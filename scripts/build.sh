#!/usr/bin/env bash
# Configures (once) and builds splitmoe into build/ with Ninja and ccache. Idempotent: a second
# run only rebuilds what changed. BUILD_DIR and CMAKE_BUILD_TYPE may be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
# ccache keys on paths relative to the checkout, so another clone (CI's) reuses the objects.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-RelWithDebInfo}"
fi
# Two cores, and the large translation units need memory: never more than 2 jobs.
cmake --build "$BUILD_DIR" -j "${SPLITMOE_JOBS:-2}"
