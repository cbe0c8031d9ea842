#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, docs/fuzzing.md) with clang-14 into build-fuzz/ and
# runs each for a fixed time over a copy of its seed corpus (tests/fuzz/corpus/<target>/, never
# modified). Fails on any crash, sanitizer report, leak, timeout or out-of-memory, printing the
# input that caused it (kept under build-fuzz/artifacts/). Idempotent; a second run only rebuilds
# what changed.
#   ./scripts/fuzz.sh                        # every target, FUZZ_SECONDS (default 10) each
#   ./scripts/fuzz.sh 300 config_fuzz        # one target for 5 minutes
#   FUZZ_KEEP_CORPUS=1 ./scripts/fuzz.sh     # keep the grown corpora in build-fuzz/corpus/
# Reproduce a failure: build-fuzz/fuzz/<target> build-fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
SECONDS_EACH=${1:-${FUZZ_SECONDS:-10}}
shift || true
BUILD=build-fuzz

# target:max_len (bytes): enough for the seeds and what the target does with an input.
ALL_TARGETS=(
  config_fuzz:16384
  safetensors_fuzz:65536
  tokenizer_load_fuzz:65536
  tokenizer_fuzz:4096
  generate_request_fuzz:8192
  decode_actor_fuzz:2048
  prefill_request_fuzz:4096
  openai_request_fuzz:8192
  jinja_fuzz:16384
)
if [ $# -gt 0 ]; then
  targets=()
  for name in "$@"; do
    found=""
    for t in "${ALL_TARGETS[@]}"; do [ "${t%%:*}" = "$name" ] && found=$t; done
    [ -n "$found" ] || { echo "fuzz: unknown target $name" >&2; exit 2; }
    targets+=("$found")
  done
else
  targets=("${ALL_TARGETS[@]}")
fi

# As in build.sh: ccache keys relative to the checkout.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
if [ ! -f "$BUILD/build.ninja" ]; then
  CC=${FUZZ_CC:-clang-14} CXX=${FUZZ_CXX:-clang++-14} cmake -S . -B "$BUILD" -G Ninja \
    -DSPLITMOE_FUZZ=ON -DSPLITMOE_ENABLE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
names=()
for t in "${targets[@]}"; do names+=("${t%%:*}"); done
cmake --build "$BUILD" -j "${SPLITMOE_JOBS:-2}" --target "${names[@]}"

work=$(mktemp -d "${TMPDIR:-/tmp}/splitmoe_fuzz_run.XXXXXX")
trap 'rm -rf "$work"' EXIT
export SPLITMOE_SOURCE_DIR=$SRC OPENBLAS_NUM_THREADS=1 TMPDIR=$work
export LSAN_OPTIONS="suppressions=$SRC/scripts/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

failed=()
summary=()
for t in "${targets[@]}"; do
  name=${t%%:*}
  max_len=${t##*:}
  corpus=$work/$name/corpus
  artifacts=$SRC/$BUILD/artifacts/$name
  mkdir -p "$corpus" "$artifacts"
  cp -r "tests/fuzz/corpus/$name/." "$corpus/"
  dict=()
  case $name in
    config_fuzz | safetensors_fuzz | tokenizer_load_fuzz | openai_request_fuzz) dict=(-dict=tests/fuzz/json.dict) ;;
  esac
  log=$work/$name/log
  echo "fuzz: $name for ${SECONDS_EACH}s (max_len $max_len)"
  start=$(date +%s)
  rc=0
  # The outer timeout catches a hang outside libFuzzer's own -timeout (setup, exit).
  timeout --signal=KILL $((SECONDS_EACH + 300)) "$BUILD/fuzz/$name" "$corpus" "${dict[@]}" \
    -max_total_time="$SECONDS_EACH" -max_len="$max_len" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1 || rc=$?
  elapsed=$(($(date +%s) - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  cov=$(grep -aoE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  line=$(printf '%-22s %4ss  execs %-9s exec/s %-6s %-22s peak RSS %s MB' "$name" "$elapsed" \
         "${execs:--}" "${rate:--}" "${cov:--}" "${rss:--}")
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    summary+=("$line  FAILED (exit $rc)")
    echo "fuzz: $name FAILED (exit $rc); the end of its log:" >&2
    tail -n 60 "$log" >&2
    grep -aoE "Test unit written to [^ ]+" "$log" | awk '{print $5}' | while read -r a; do
      echo "fuzz: the input ($a, $(stat -c %s "$a") bytes; first 512 shown):" >&2
      head -c 512 "$a" | od -A d -t x1z -v >&2 || true
      echo "fuzz: reproduce with: $BUILD/fuzz/$name $a" >&2
    done
  else
    summary+=("$line")
  fi
  if [ "${FUZZ_KEEP_CORPUS:-0}" != "0" ]; then
    rm -rf "${BUILD:?}/corpus/$name"
    mkdir -p "$BUILD/corpus"
    cp -r "$corpus" "$BUILD/corpus/$name"
  fi
done

echo "fuzz: summary (${SECONDS_EACH}s each)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs under $BUILD/artifacts/)" >&2
  exit 1
fi
echo "fuzz: every target ran clean"
