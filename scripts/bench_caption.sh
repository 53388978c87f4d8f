#!/usr/bin/env bash
# Captions/s of `blip2 caption` over a folder, at several --batch sizes in one run (a benchmark, not a test).
# Usage: scripts/bench_caption.sh MODEL_DIR WEIGHTS "1 4 8" [IMAGES] [THREADS]
#   e.g. ./build/blip2 make-random --like xl --out /tmp/blip2-xl-bf16 --dtype bf16
#        scripts/bench_caption.sh /tmp/blip2-xl-bf16 int8 "1 8 4" 32 2
# Every caption has exactly 20 tokens (--min-new-tokens 20 --max-new-tokens 20: random weights would stop
# anywhere). The folder holds IMAGES copies of the fixture images (default 32). Prints one markdown row per
# batch size with the stage split from the run's --json summary.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 weights=$2 batches=$3 n=${4:-32} threads=${5:-2}
blip2=${BLIP2:-./build/blip2}
dir=$(mktemp -d /tmp/blip2-bench-caption.XXXXXX)
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/images"
fixtures=(tests/fixtures/images/{chelsea,astronaut,camera,coffee,logo,motorcycle_left,rocket,hubble_deep_field}.*)
for ((i = 0; i < n; i++)); do
  f=${fixtures[$((i % ${#fixtures[@]}))]}
  cp "$f" "$dir/images/$(printf %03d "$i").${f##*.}"
done
echo "model $model, --weights $weights, --threads $threads, $n images, 20 tokens each; $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| batch | seconds | captions/s | vs batch ${batches%% *} | read+preprocess (own thread) | vision | images / vision pass | prompt | decode | decoder steps |"
echo "|---|---|---|---|---|---|---|---|---|---|"
base=""
for b in $batches; do
  json=$("$blip2" --weights "$weights" --threads "$threads" caption "$dir/images" --model "$model" --batch "$b" \
         --min-new-tokens 20 --max-new-tokens 20 --output "$dir/out-$b.jsonl" --json 2>/dev/null)
  python3 - "$b" "$json" "$base" <<'PY'
import json, sys
b, j, base = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
s = j["stages_seconds"]
rate = j["captions_per_second"]
rel = f"{rate / float(base):.2f}x" if base else "1.00x"
passes = j["vision_passes"] or 1
print(f"| {b} | {j['seconds']:.1f} | {rate:.3f} | {rel} | {s['read_preprocess']:.1f} s | {s['vision']:.1f} s | "
      f"{(j['images'] + j['failed']) / passes:.1f} | {s['prompt']:.1f} s | {s['decode']:.1f} s | {j['decoder_steps']} |")
PY
  [ -n "$base" ] || base=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["captions_per_second"])' "$json")
done
