#!/usr/bin/env bash
# Installs llama.cpp as shipped by the npm package node-llama-cpp (prebuilt libllama for
# linux-x64, CPU only) into bench/llama_cpp/node_modules (git-ignored), on demand. Only the
# package and its CPU linux-x64 binaries: the optional CUDA/Vulkan/other-platform builds are
# left out, and the postinstall step neither downloads nor builds anything.
#   bench/llama_cpp/install.sh            # no-op when already installed
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="${NODE_LLAMA_CPP_VERSION:-3.22.1}"
if [[ -f "$here/node_modules/node-llama-cpp/package.json" ]] &&
   [[ -d "$here/node_modules/@node-llama-cpp/linux-x64" ]] &&
   grep -q "\"version\": \"$version\"" "$here/node_modules/node-llama-cpp/package.json"; then
  exit 0
fi
echo "installing node-llama-cpp@$version into $here/node_modules" >&2
NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --prefix "$here" --no-save --no-audit --no-fund \
  --omit=optional "node-llama-cpp@$version" "@node-llama-cpp/linux-x64@$version" >&2
