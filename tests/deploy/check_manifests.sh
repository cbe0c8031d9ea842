#!/usr/bin/env bash
# Offline check of the Kubernetes manifests (deploy/k8s): every YAML document parses, kubectl
# renders (`kubectl kustomize`) and decodes them (`kubectl label --local`, `kubectl set env
# --local`) without a cluster, and tests/deploy/check_manifests.py checks what matters for
# splitmoe (probes, scrape annotations, args the roles accept, ports, Services, mounts, expert
# shards and their autoscalers, the image, Secrets/ConfigMaps/PVCs defined or operator-provided).
#
#   tests/deploy/check_manifests.sh [SPLITMOE_BINARY]
#
# With the binary (or $SPLITMOE_BIN), the roles' flags are checked by running it (each role
# with the container's flags, stopped at its first step: opening a model directory that does
# not exist); without, they are read from tools/cli's sources.
# Exit: 0 all good, 1 a check failed, 77 skipped (kubectl absent: Debian's kubernetes-client).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${1:-${SPLITMOE_BIN:-}}"

kubectl="$(command -v "${KUBECTL:-kubectl}" || true)"
if [ -z "$kubectl" ]; then
  echo "SKIP: kubectl not found (Debian 12: apt-get install kubernetes-client); the manifests were not checked"
  exit 77
fi
python=/usr/bin/python3
if ! "$python" -c 'import yaml' 2>/dev/null; then
  echo "FAIL: $python cannot import yaml (Debian 12: apt-get install python3-yaml)" >&2
  exit 1
fi
if [ -n "$bin" ] && [ ! -x "$bin" ]; then
  echo "FAIL: $bin is not an executable splitmoe binary" >&2
  exit 1
fi
start=$(date +%s%N)
rc=0
"$python" "$repo/tests/deploy/check_manifests.py" --repo "$repo" --kubectl "$kubectl" \
  ${bin:+--bin "$bin"} || rc=$?
end=$(date +%s%N)
version=$("$kubectl" version --client 2>/dev/null | grep -o 'v[0-9]*\.[0-9]*\.[0-9]*' | head -1 || true)
if [ "$rc" -eq 0 ]; then
  printf 'check_manifests: deploy/k8s OK (kubectl %s; flags from %s; %d ms)\n' "$version" \
    "${bin:-the sources}" "$(( (end - start) / 1000000 ))"
fi
exit "$rc"
