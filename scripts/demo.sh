#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install dependencies, build, write the embedded
# tiny DeepSeek-V3-architecture model (with the real DeepSeek-V3 tokenizer) and answer a request
# with it. Idempotent; a second run skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
MODEL_DIR=${MODEL_DIR:-build/models/tiny-v3}
if [ ! -f "$MODEL_DIR/config.json" ]; then
  build/bin/splitmoe make-tiny --out "$MODEL_DIR"
fi
build/bin/splitmoe inspect --model "$MODEL_DIR"
PROMPT=${PROMPT:-"The capital of France is"}
echo "prompt: $PROMPT"
build/bin/splitmoe generate --model "$MODEL_DIR" --prompt "$PROMPT" --max-tokens 24 --json
