#!/usr/bin/env bash
# What fits where: per checkpoint directory and weight format, the weights' size in that format (on disk
# as `blip2 quantize` writes it; the float rows are the checkpoint as stored), RSS after load, peak RSS and
# decode ms/token with its fraction of the same run's bandwidth floor, from `blip2 bench --json` (a
# benchmark, not a test). Formats whose weights alone exceed the machine's memory are listed, not run.
# Usage: scripts/bench_fits.sh "DIR..." "FORMAT..." [NEW_TOKENS] [THREADS]
#   e.g. scripts/bench_fits.sh "/tmp/blip2-xl-bf16 /tmp/blip2-xxl-bf16" "stored int8 int4 f32" 8 2
set -euo pipefail
cd "$(dirname "$0")/.."
dirs=$1 formats=$2 tokens=${3:-8} threads=${4:-2}
blip2=${BLIP2:-./build/blip2}
mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $((mem_kib / 1048576)) GiB, --threads $threads," \
  "$tokens new tokens; $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| checkpoint | format | weights GB | RSS after load GiB | peak RSS GiB | decode ms/token | of bandwidth floor | load s |"
echo "|---|---|---|---|---|---|---|---|"
for dir in $dirs; do
  # float32 takes twice the bytes of a bf16/f16 checkpoint: estimated from the stored size, before running.
  stored_bytes=$(du -sb --apparent-size "$dir" | cut -f1)
  for f in $formats; do
    if [ "$f" = f32 ] && [ $((stored_bytes * 2 / 1024)) -gt "$mem_kib" ]; then
      echo "| $(basename "$dir") | $f | $(python3 -c "print(f'{2 * $stored_bytes / 1e9:.1f}')") | does not fit | | | | |"
      continue
    fi
    json=$("$blip2" --weights "$f" --threads "$threads" bench --model "$dir" --image tests/fixtures/images/chelsea.png \
           --new-tokens "$tokens" --repeat 1 --warmup 1 --json 2>/dev/null)
    python3 - "$(basename "$dir")" "$f" "$json" <<'PY'
import json, sys
name, f, j = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m, fl = j["memory"], j["floors"]
print(f"| {name} | {f} | {m['weights_gb']:.2f} | {m['rss_after_load_gib']:.2f} | {m['peak_rss_gib']:.2f} | "
      f"{fl['decode_step_s'] * 1e3:.0f} | {fl['decode_fraction_of_floor'] * 100:.0f} % | {m['load_s']:.1f} |")
PY
  done
done
