#!/usr/bin/env bash
# Load time, first-caption latency and peak RSS of a pre-quantized checkpoint (blip2 quantize) against
# converting its float original at load, from a cold page cache, alternating in one run (a benchmark, not a
# test). Also checks that both give the same caption (token ids) and prints the file sizes.
# Usage: scripts/bench_quantized_load.sh FLOAT_DIR QUANTIZED_DIR WEIGHTS [ROUNDS] [THREADS]
#   e.g. ./build/blip2 make-random --like xxl --out /tmp/blip2-xxl-bf16 --dtype bf16
#        ./build/blip2 quantize --model /tmp/blip2-xxl-bf16 --weights int4 --out /tmp/blip2-xxl-int4
#        scripts/bench_quantized_load.sh /tmp/blip2-xxl-bf16 /tmp/blip2-xxl-int4 int4 2
# WEIGHTS is the --weights the quantized copy was made with. "Cold" drops the page cache before each command
# (/proc/sys/vm/drop_caches, root only; without it every run after the first reads from a warm cache, and
# the rows say so). Per round and variant: `bench --repeat 1 --warmup 0` for the load time and peak RSS,
# then `caption --max-new-tokens 3` for the wall time from process start to caption.
set -euo pipefail
cd "$(dirname "$0")/.."
float=$1 quant=$2 weights=$3 rounds=${4:-1} threads=${5:-2}
blip2=${BLIP2:-./build/blip2}
image=tests/fixtures/images/chelsea.png
out=$(mktemp -d /tmp/blip2-bench-qload.XXXXXX)
trap 'rm -rf "$out"' EXIT

cold() {
  sync
  if [ -w /proc/sys/vm/drop_caches ]; then echo 3 >/proc/sys/vm/drop_caches; echo cold; else echo warm; fi
}
echo "float $float ($(du -sb "$float" | cut -f1) bytes), quantized $quant ($(du -sb "$quant" | cut -f1) bytes)," \
  "--weights $weights, --threads $threads; $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| round | variant | cache | load s | peak RSS after load GiB | caption wall s | caption peak RSS GiB | caption ids |"
echo "|---|---|---|---|---|---|---|---|"
for ((r = 1; r <= rounds; r++)); do
  for variant in converted mapped; do
    if [ $variant = converted ]; then dir=$float args=(--weights "$weights"); else dir=$quant args=(); fi
    cache=$(cold)
    "$blip2" "${args[@]}" --threads "$threads" bench --model "$dir" --image "$image" --repeat 1 --warmup 0 \
      --new-tokens 3 --json >"$out/bench.json" 2>/dev/null
    cache2=$(cold)
    /usr/bin/time -f "%e %M" -o "$out/time" "$blip2" "${args[@]}" --threads "$threads" caption "$image" \
      --model "$dir" --min-new-tokens 3 --max-new-tokens 3 --json >"$out/caption-$variant.txt" 2>/dev/null
    python3 - "$r" "$variant" "$cache/$cache2" "$out/bench.json" "$out/time" "$out/caption-$variant.txt" <<'PY'
import json, sys
r, variant, cache, bench, timing, caption = sys.argv[1:]
m = json.load(open(bench))["memory"]
wall, rss_kib = open(timing).read().split()
text = json.load(open(caption))["results"][0]["sequences"][0]["ids"]
print(f"| {r} | {variant} | {cache} | {m['load_s']:.1f} | {m['peak_rss_after_load_gib']:.2f} | {float(wall):.1f} | "
      f"{int(rss_kib) / 2**20:.2f} | {text} |")
PY
  done
  cmp -s "$out/caption-converted.txt" "$out/caption-mapped.txt" || { echo "round $r: the captions differ" >&2; exit 1; }
done
