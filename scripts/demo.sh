#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install dependencies, build, write the embedded
# tiny DeepSeek-V3-architecture model (with the real DeepSeek-V3 tokenizer), start a local
# cluster with `splitmoe up` (router, prefill, decode and two expert services as separate
# processes, MLA latents over UCX) and answer a request through its gRPC API; the
# single-process engine answers the same request for comparison. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
BIN=build/bin/splitmoe
MODEL_DIR=${MODEL_DIR:-build/models/tiny-v3}
if [ ! -f "$MODEL_DIR/config.json" ]; then
  "$BIN" make-tiny --out "$MODEL_DIR"
fi
"$BIN" inspect --model "$MODEL_DIR"
PROMPT=${PROMPT:-"The capital of France is"}

LOG=$(mktemp)
"$BIN" up --model "$MODEL_DIR" --prefill 1 --decode 1 --experts 2 --http-port 0 >"$LOG" &
UP=$!
trap 'kill -TERM $UP 2>/dev/null || true; wait $UP 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 1200); do
  grep -q '^ready grpc=' "$LOG" && break
  kill -0 $UP 2>/dev/null || { echo "splitmoe up failed" >&2; exit 1; }
  sleep 0.1
done
ENDPOINT=$(sed -n 's/^ready grpc=\([^ ]*\).*/\1/p' "$LOG")
HTTP=$(sed -n 's/^ready .*http=\([^ ]*\).*/\1/p' "$LOG")
[ -n "$ENDPOINT" ] || { echo "splitmoe up did not become ready" >&2; exit 1; }
echo "cluster ready at $ENDPOINT"
echo "prompt: $PROMPT"
echo "--- through the cluster (splitmoe generate --endpoint $ENDPOINT)"
CLUSTER=$("$BIN" generate --endpoint "$ENDPOINT" --prompt "$PROMPT" --max-tokens 24 --json)
echo "$CLUSTER"
echo "--- single-process engine (splitmoe generate --model $MODEL_DIR)"
SINGLE=$("$BIN" generate --model "$MODEL_DIR" --prompt "$PROMPT" --max-tokens 24 --json)
echo "$SINGLE"
[ "$CLUSTER" = "$SINGLE" ] && echo "identical" || echo "note: the outputs differ (see above)"
echo "--- the OpenAI-compatible HTTP API ($HTTP/v1/chat/completions)"
/usr/bin/python3 - "$HTTP" "$(basename "$MODEL_DIR")" <<'PY'
import json, sys, urllib.request
url, model = sys.argv[1], sys.argv[2]
body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 12, "temperature": 0}
req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
print(json.dumps(json.load(urllib.request.urlopen(req, timeout=60)), ensure_ascii=False))
PY
echo "--- cluster status"
"$BIN" status --endpoint "$ENDPOINT"
