#!/usr/bin/env bash
# splitmoe's single-process engine (build/bench/engine_bench) against llama.cpp (node-llama-cpp's
# prebuilt CPU libllama) on the same benchmark model, same thread count, in one run:
#
#   bench/llama_cpp_compare.sh [--rounds N] [--threads T] [--build DIR] [--decode-tokens N]
#                              [--repeats N] [--flash-attention on|off] [--out DIR]
#                              [--quiet-wait S]
#
# 1. The model is engine_bench's own: $TMPDIR/splitmoe_bench_model (model::BenchModelOptions(),
#    written by engine_bench itself when missing; bench_model.h writes the same bytes into
#    splitmoe_cluster_bench_model).
# 2. tools/reference/make_gguf.py converts it to GGUF (deepseek2), F32 and BF16, when missing or
#    older than the checkpoint or the converter.
# 3. Proof it is the same model: splitmoe score vs llama.cpp on the F32 GGUF (flash attention off,
#    F32 KV cache), max |logprob difference| over the prompt's token and top-5 logprobs.
# 4. For each round, interleaved: llama.cpp BF16, splitmoe BF16 (W=1), llama.cpp F32, splitmoe
#    fp32 (W=0). Each figure is the best over rounds and over --repeats inside each run
#    (llama.cpp: repeated measurements; engine_bench: --benchmark_repetitions, each >= 1 s, after
#    1 s of warm-up: a first 512-token prefill touches the mapped weights' pages and reads ~2x
#    slower).
#    splitmoe: BM_Decode/W/{1,8} (context 256, one step timed) and BM_Prefill/W/512.
#    llama.cpp: B sequences with a 256-token prompt each, then --decode-tokens greedy steps
#    together (B * steps / wall time; context 256..320), and one 512-token prompt up to its first
#    sampled token.
# Needs: build/ (engine_bench, splitmoe), node + npm (llama.cpp is installed on demand into the
# git-ignored bench/llama_cpp/node_modules by bench/llama_cpp/install.sh), /usr/bin/python3 +
# numpy. Threads: OMP_NUM_THREADS=T for splitmoe, n_threads=T for llama.cpp. The figures are as
# noisy as the machine: before each run the script waits up to --quiet-wait seconds (default 30)
# for the rest of the machine to use under half a core, and prints how many cores other work was
# using when the run started (from /proc/stat over one second).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds=2 threads=2 build="$root/build" decode_tokens=64 repeats=3 flash=off out="" quiet_wait=30
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    --decode-tokens) decode_tokens="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --flash-attention) flash="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --quiet-wait) quiet_wait="$2"; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ "$flash" == on || "$flash" == off ]] || { echo "--flash-attention on|off" >&2; exit 2; }
py=/usr/bin/python3
tmp="${TMPDIR:-/tmp}"
model="$tmp/splitmoe_bench_model"
gguf_dir="$tmp/splitmoe_bench_gguf"
out="${out:-$(mktemp -d "$tmp/llama_cpp_compare.XXXXXX")}"
mkdir -p "$out" "$gguf_dir"
engine_bench="$build/bench/engine_bench"
splitmoe="$build/bin/splitmoe"
for b in "$engine_bench" "$splitmoe"; do
  [[ -x "$b" ]] || { echo "missing $b: build first (scripts/build.sh)" >&2; exit 1; }
done
log() { echo "== $*" >&2; }
# cores busy over one second (everything not idle/iowait), as "1.23"
busy() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  local total=0 idle=$(( (b[4] - a[4]) + (b[5] - a[5]) ))
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  awk -v t="$total" -v i="$idle" -v n="$(nproc)" 'BEGIN { printf "%.2f", (t > 0) ? n * (t - i) / t : 0 }'
}
# waits (up to --quiet-wait s) for other work to use under half a core; prints the busy cores
load() {
  local deadline=$(( SECONDS + quiet_wait )) b
  while :; do
    b="$(busy)"
    if awk -v b="$b" 'BEGIN { exit !(b < 0.5) }' || (( SECONDS >= deadline )); then
      echo "$b"; return
    fi
    sleep 2
  done
}

"$root/bench/llama_cpp/install.sh"

if [[ ! -f "$model/config.json" ]]; then
  log "writing the bench model with engine_bench itself (one short BM_Prefill/1/32)"
  OMP_NUM_THREADS="$threads" "$engine_bench" --benchmark_filter='^BM_Prefill/1/32/' \
    --benchmark_min_time=0 >/dev/null
fi

for dt in f32 bf16; do
  g="$gguf_dir/bench-$dt.gguf"
  if [[ ! -f "$g" || "$g" -ot "$model/model.safetensors" || "$g" -ot "$root/tools/reference/make_gguf.py" ]]; then
    log "converting to $g"
    "$py" "$root/tools/reference/make_gguf.py" --model "$model" --out "$g" --outtype "$dt"
  fi
done

log "same model? splitmoe score vs llama.cpp F32 GGUF"
prompt="0,17,99,1234,5,777,31000,42,2048,9,16383,300,7,65,12345,2"
"$splitmoe" score --model "$model" --prompt-tokens "$prompt" --top-logprobs 5 --json \
  >"$out/score_splitmoe.json"
node "$root/bench/llama_cpp_bench.mjs" logprobs --model "$gguf_dir/bench-f32.gguf" \
  --tokens "$prompt" --top 5 --threads "$threads" >"$out/score_llama_cpp.json"

fa_flag=(--flash-attention false)
[[ "$flash" == on ]] && fa_flag=(--flash-attention true)
for ((r = 1; r <= rounds; r++)); do
  for pair in "bf16 1" "f32 0"; do
    set -- $pair
    dt="$1" w="$2"
    l="$(load)"
    log "round $r: llama.cpp $dt (load $l)"
    node "$root/bench/llama_cpp_bench.mjs" speed --model "$gguf_dir/bench-$dt.gguf" \
      --threads "$threads" --context 256 --decode-tokens "$decode_tokens" --prefill 512 \
      --batches 1,8 --repeats "$repeats" "${fa_flag[@]}" >"$out/llama_${dt}_r$r.json"
    echo "$l" >"$out/llama_${dt}_r$r.load"
    l="$(load)"
    log "round $r: splitmoe $dt (W=$w) (load $l)"
    OMP_NUM_THREADS="$threads" "$engine_bench" \
      --benchmark_filter="^BM_(Prefill/$w/512/0|Decode/$w/[18])/" --benchmark_min_time=1 \
      --benchmark_min_warmup_time=1 \
      --benchmark_counters_tabular=true --benchmark_repetitions="$repeats" \
      --benchmark_out="$out/splitmoe_${dt}_r$r.json" --benchmark_out_format=json >&2
    echo "$l" >"$out/splitmoe_${dt}_r$r.load"
  done
done

"$py" - "$out" "$rounds" <<'EOF'
import glob, json, os, sys
out, rounds = sys.argv[1], int(sys.argv[2])

def load(p):
    with open(p) as f:
        return json.load(f)

# the same model: max |logprob difference|
a, b = load(f"{out}/score_splitmoe.json"), load(f"{out}/score_llama_cpp.json")
worst_tok = worst_top = 0.0
top1_same = n = 0
for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:]):
    worst_tok = max(worst_tok, abs(x["logprob"] - y["logprob"]))
    ty = dict((t, v) for t, v in y["top_logprobs"])
    for t, v in x["top_logprobs"]:
        if t in ty:
            worst_top = max(worst_top, abs(v - ty[t]))
    top1_same += x["top_logprobs"][0][0] == y["top_logprobs"][0][0]
    n += 1

rows = {}
meta = None
for dt in ("bf16", "f32"):
    llama = {"b1": 0.0, "b8": 0.0, "p512": 0.0, "seq8": None, "loads": []}
    smoe = {"b1": 0.0, "b8": 0.0, "p512": 0.0, "loads": []}
    for r in range(1, rounds + 1):
        j = load(f"{out}/llama_{dt}_r{r}.json")
        meta = j
        llama["b1"] = max(llama["b1"], j["decode"]["1"])
        llama["b8"] = max(llama["b8"], j["decode"]["8"])
        llama["p512"] = max(llama["p512"], j["prefill_tokens_per_s"])
        llama["seq8"] = j.get("decode_sequences_per_step", {}).get("8")
        llama["loads"].append(open(f"{out}/llama_{dt}_r{r}.load").read().strip())
        g = load(f"{out}/splitmoe_{dt}_r{r}.json")
        for bm in g["benchmarks"]:  # BM_Prefill/W/512/real_time, BM_Decode/W/B/real_time
            if bm.get("run_type", "iteration") != "iteration":
                continue  # each repetition's own figure, not the mean/median/stddev rows
            kind, _, arg = bm["name"].split("/")[:3]
            key = "p512" if kind == "BM_Prefill" else f"b{arg}"
            smoe[key] = max(smoe[key], bm.get("tokens_per_s", 0.0))
        smoe["loads"].append(open(f"{out}/splitmoe_{dt}_r{r}.load").read().strip())
    rows[dt] = (llama, smoe)

print()
lc = meta["llama_cpp"]
print(f"llama.cpp: node-llama-cpp {lc['node_llama_cpp']}, llama.cpp release {lc['llama_cpp_release']} "
      f"({lc['build']} CPU build), flash attention {meta['flash_attention']}, {meta['threads']} threads")
print(f"splitmoe: build/bench/engine_bench, OMP_NUM_THREADS={meta['threads']}")
print(f"same model: max |logprob diff| splitmoe score vs llama.cpp F32 = {worst_tok:.2e} (prompt tokens), "
      f"{worst_top:.2e} (top-5 entries); top-1 agrees at {top1_same}/{n} positions")
print()
hdr = f"{'engine':<22}{'dtype':<7}{'decode b1 tok/s':>17}{'decode b8 tok/s':>17}{'prefill 512 tok/s':>19}   other work, cores (per round)"
print(hdr)
print("-" * len(hdr))
for dt, (llama, smoe) in rows.items():
    print(f"{'llama.cpp':<22}{dt:<7}{llama['b1']:>17.1f}{llama['b8']:>17.1f}{llama['p512']:>19.1f}   {' '.join(llama['loads'])}")
    print(f"{'splitmoe':<22}{dt:<7}{smoe['b1']:>17.1f}{smoe['b8']:>17.1f}{smoe['p512']:>19.1f}   {' '.join(smoe['loads'])}")
    ratio = lambda k: smoe[k] / llama[k] if llama[k] else float("nan")
    print(f"{'splitmoe / llama.cpp':<22}{dt:<7}{ratio('b1'):>16.2f}x{ratio('b8'):>16.2f}x{ratio('p512'):>18.2f}x")
    print()
seq8 = rows["bf16"][0]["seq8"]
if seq8 is not None:
    print(f"llama.cpp b8: {seq8:.2f} sequences per llama_decode on average (node-llama-cpp's batching; 8 = fully batched)")
print(f"raw results: {out}")
EOF
