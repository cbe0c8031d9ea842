#!/usr/bin/env bash
# `splitmoe bench` at several concurrencies, the engine in process (--model) and a local cluster
# (`splitmoe up`, --endpoint), on the same workload and machine, then the plot:
#   tools/bench_concurrency.sh MODEL_DIR OUT_DIR [UP_FLAGS...]
# Writes OUT_DIR/{model,endpoint}-cC.json and OUT_DIR/bench_concurrency.png.
set -euo pipefail
model=$1 out=$2
shift 2
bin=${SPLITMOE_BIN:-$(dirname "$0")/../build/bin/splitmoe}
requests=${REQUESTS:-32} prompt=${PROMPT_TOKENS:-128} tokens=${MAX_TOKENS:-32}
concurrencies=${CONCURRENCIES:-"1 2 4 8 16"}
mkdir -p "$out"
for c in $concurrencies; do
  "$bin" bench --model "$model" --concurrency "$c" --requests "$requests" \
    --prompt-tokens "$prompt" --max-tokens "$tokens" --json "$out/model-c$c.json"
done
log=$(mktemp)
"$bin" up --model "$model" "$@" > "$log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 600); do grep -q "^ready grpc=" "$log" && break; sleep 0.2; done
endpoint=$(sed -n 's/^ready grpc=//p' "$log")
[ -n "$endpoint" ] || { cat "$log"; exit 1; }
"$bin" bench --endpoint "$endpoint" --concurrency 2 --requests 4 --prompt-tokens 8 \
  --max-tokens 4 > /dev/null  # warm-up: connections and streams open
for c in $concurrencies; do
  "$bin" bench --endpoint "$endpoint" --concurrency "$c" --requests "$requests" \
    --prompt-tokens "$prompt" --max-tokens "$tokens" --json "$out/endpoint-c$c.json"
done
/usr/bin/python3 "$(dirname "$0")/plot_bench.py" --out "$out/bench_concurrency.png" \
  --title "$(basename "$model"): $requests x ($prompt + $tokens) tokens" \
  --series engine "$out"/model-c*.json --series cluster "$out"/endpoint-c*.json
