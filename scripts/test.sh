#!/usr/bin/env bash
# Runs every test: installs what is missing, builds, then ctest (all labels). Idempotent.
# CTEST_ARGS may add ctest options, e.g. CTEST_ARGS="-L unit".
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
cd "${BUILD_DIR:-build}"
# shellcheck disable=SC2086
ctest --output-on-failure -j 2 ${CTEST_ARGS:-}
