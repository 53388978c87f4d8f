#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with ASan + UBSan) and runs each for a bounded time from its seed
# corpus, then prints per target the executions, the rate and the coverage libFuzzer reached (cov: edges,
# ft: features). Exits non-zero if any target crashed, leaked, timed out or ran out of memory; the input that
# did it is in BUILD/fuzz-artifacts/TARGET/ and the log in BUILD/fuzz-logs/TARGET.log.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s, every target)
# Environment: BLIP2_FUZZ_BUILD (default build-fuzz), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
build=${BLIP2_FUZZ_BUILD:-build-fuzz}
jobs=${JOBS:-$(nproc)}
all=(fuzz_safetensors fuzz_checkpoint_index fuzz_config fuzz_image fuzz_t5_model fuzz_opt_files fuzz_t5_text
     fuzz_opt_text fuzz_llama_text fuzz_bert_text fuzz_chat_request fuzz_base64 fuzz_tar fuzz_quantized_checkpoint)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (Debian: apt-get install clang)" >&2; exit 2; }
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DBLIP2_FUZZ=ON -DBLIP2_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}"
bash fuzz/seeds.sh "$build/fuzz-seeds"

# The parsers' scratch files (symbolic links to memfds) go under a directory removed at the end.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

failed=0
rows=()
for t in "${targets[@]}"; do
  corpus=$build/fuzz-corpus/$t artifacts=$build/fuzz-artifacts/$t log=$build/fuzz-logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  dict=()
  case $t in
    fuzz_chat_request) dict=(-dict=fuzz/chat_request.dict) ;;
    fuzz_config) dict=(-dict=fuzz/config.dict) ;;
  esac
  echo "== $t: ${secs} s"
  rc=0
  TMPDIR=$scratch "$build/fuzz/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" "$corpus" "$build/fuzz-seeds/$t" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
    failed=1
    grep -m1 -E 'ERROR: |runtime error|deadly signal|out-of-memory|timeout' "$log" >&2 || true
    echo "   log: $log; input: $(ls -t "$artifacts" | head -1)" >&2
  fi
  rows+=("$(printf '%-22s %12s %9s %7s %7s  %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$status")")
done

echo
printf '%-22s %12s %9s %7s %7s  %s\n' target executions exec/s cov ft result
printf '%s\n' "${rows[@]}"
exit $failed
