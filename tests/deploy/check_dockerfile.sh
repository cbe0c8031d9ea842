#!/usr/bin/env bash
# Offline check of deploy/Dockerfile (no docker): structure (hadolint-like), every runtime
# package in Debian 12's apt lists, the binary's shared libraries all provided by the runtime
# stage's packages (with the binary), and the files COPY takes present after setup/build.
#
#   tests/deploy/check_dockerfile.sh [SPLITMOE_BINARY]     (or $SPLITMOE_BIN)
#
# Exit: 0 all good, 1 a check failed, 77 skipped (not a Debian 12 machine with apt lists, the
# only place the package names can be checked).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${1:-${SPLITMOE_BIN:-}}"
if ! grep -qs '^VERSION_ID="12"' /etc/os-release || ! command -v apt-cache >/dev/null ||
   ! apt-cache show --no-all-versions libc6 >/dev/null 2>&1; then
  echo "SKIP: not Debian 12 with apt package lists (apt-get update); deploy/Dockerfile not checked"
  exit 77
fi
if [ -n "$bin" ] && [ ! -x "$bin" ]; then
  echo "FAIL: $bin is not an executable splitmoe binary" >&2
  exit 1
fi
rc=0
/usr/bin/python3 "$repo/tests/deploy/check_dockerfile.py" --repo "$repo" ${bin:+--bin "$bin"} || rc=$?
[ "$rc" -eq 0 ] && echo "check_dockerfile: deploy/Dockerfile OK${bin:+ (libraries of $bin)}"
exit "$rc"
