#!/usr/bin/env bash
# The GPU check: one command for a fresh H100/H200 machine (16 cores, this repository copied, CUDA driver and
# toolkit, no internet). It configures and builds the CUDA backend, runs the GPU tests, writes a random
# checkpoint of the XXL shape, benchmarks it on the GPU in bf16, f16 and int8 at batch 1 and sweeps batch sizes
# 1..256, then prints one JSON summary (and writes every log and JSON under $OUT, default /tmp/gpu-check).
#
# Time: at most BLIP2_GPU_BUDGET_S seconds (default 450, inside the 8 minutes a lent machine gives). Each step
# is skipped, and named in the summary's "skipped", once too little time is left for it; the steps run in
# order of value (tests, batch-1 latency, sweep, the other formats).
#
# BLIP2_GPU_MODEL=DIR benchmarks that model instead of a random XXL one (a dry run: models/tiny-blip2-t5).
#
# Without Debian's -dev packages on the machine (they have no archive to install from), run
# scripts/gpu-deps.sh beforehand where the archive is reachable: this script unpacks .gpu-deps/*.deb into a
# private root and builds against it.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${BLIP2_GPU_BUDGET_S:-450}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
jobs=$(nproc)
skipped=()
left() { echo $((budget - (SECONDS - start))); }
say() { echo "[gpu-check $((SECONDS - start))s] $*" >&2; }
# step NAME SECONDS_NEEDED: false (and NAME recorded as skipped) when fewer seconds are left.
step() { if [ "$(left)" -lt "$2" ]; then skipped+=("$1"); say "skipped $1 (time)"; return 1; fi; say "$1"; return 0; }

# ---- dependencies from carried Debian packages, when the system lacks them ---------------------------------
if ! pkg-config --exists sentencepiece 2>/dev/null && ls .gpu-deps/*.deb >/dev/null 2>&1; then
  root=/tmp/blip2-deps
  say "unpacking $(ls .gpu-deps/*.deb | wc -l) carried packages into $root"
  mkdir -p "$root"
  for f in .gpu-deps/*.deb; do
    if command -v dpkg >/dev/null; then dpkg -x "$f" "$root"
    else (d=$(mktemp -d) && cd "$d" && ar x "$OLDPWD/$f" && tar -xf data.tar.* -C "$root" && rm -rf "$d"); fi
  done
  lib=$root/usr/lib/x86_64-linux-gnu
  # Debian points these at OpenBLAS through update-alternatives, which unpacking does not run.
  ln -sf openblas-pthread/libopenblas.so.0 "$lib/libopenblas.so.0"
  ln -sf openblas-pthread/libopenblas.so "$lib/libopenblas.so"
  ln -sf openblas-pthread/cblas.h "$root/usr/include/x86_64-linux-gnu/cblas.h"
  export PKG_CONFIG_LIBDIR=$lib/pkgconfig:$root/usr/share/pkgconfig PKG_CONFIG_SYSROOT_DIR=$root
  export CMAKE_PREFIX_PATH=$root/usr LD_LIBRARY_PATH=$lib:$lib/openblas-pthread:${LD_LIBRARY_PATH:-}
  export CPATH=$root/usr/include:$root/usr/include/x86_64-linux-gnu:${CPATH:-}
  command -v pkg-config >/dev/null || export PATH=$root/usr/bin:$PATH PKG_CONFIG=$root/usr/bin/pkgconf
fi

# ---- build: the CUDA backend for this GPU's architecture only (the full build covers sm_80/89/90) ----------
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch=${arch:-90}
say "configure (sm_$arch) and build with $jobs jobs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
if ! { cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBLIP2_CUDA=ON \
         -DBLIP2_CUDA_ARCHITECTURES="$arch" > "$out/configure.log" 2>&1 &&
       cmake --build build-gpu -j "$jobs" --target blip2 test_ops_device test_device > "$out/build.log" 2>&1; }; then
  tail -40 "$out/configure.log" "$out/build.log" >&2
  echo '{"ok": false, "failed": "build", "logs": "'"$out"'"}'
  exit 1
fi
build_s=$((SECONDS - start))
bin=build-gpu/blip2

# ---- tests ------------------------------------------------------------------------------------------------
tests_rc=0
if step "GPU op tests and device tests" 60; then
  ./build-gpu/tests/test_ops_device > "$out/test_ops_device.log" 2>&1 || tests_rc=1
  ./build-gpu/tests/test_device > "$out/test_device.log" 2>&1 || tests_rc=1
  grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$out"/test_*.log >&2
fi

# ---- XXL-shaped checkpoint with random weights (bf16, 24.5 GB), unless BLIP2_GPU_MODEL names a model ------
model=${BLIP2_GPU_MODEL:-/tmp/blip2-xxl-bf16}
if [ ! -f "$model/config.json" ] && step "make-random XXL" 150; then
  $bin make-random --like xxl --out "$model" --dtype bf16 > "$out/make_random.log" 2>&1 || skipped+=("make-random failed")
fi
bench() {  # NAME WEIGHTS BENCH_ARGS...: one bench run, its JSON in $out/bench_NAME.json
  local name=$1 weights=$2; shift 2
  timeout "$(left)" $bin --device cuda --weights "$weights" bench --model "$model" --new-tokens 30 --quick --json "$@" \
    > "$out/bench_$name.json" 2> "$out/bench_$name.log" || { skipped+=("bench $name failed"); rm -f "$out/bench_$name.json"; }
}
if [ -f "$model/config.json" ]; then
  step "bench bf16 batch 1 and sweep" 90 && bench bf16 stored --warmup 1 --repeat 3 --sweep 1,8,32,64,128,256
  step "bench int8 batch 1" 60 && bench int8 int8 --warmup 1 --repeat 3
  step "bench f16 batch 1" 60 && bench f16 f16 --warmup 1 --repeat 3
fi

# ---- summary ----------------------------------------------------------------------------------------------
python3 - "$out" "$build_s" "$((SECONDS - start))" "$tests_rc" "${skipped[@]}" <<'PY'
import json, os, re, sys
out, build_s, total_s, tests_rc, skipped = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
def tests(name):
    p = os.path.join(out, name + ".log")
    if not os.path.exists(p): return None
    t = open(p).read()
    counts = {k: int(m.group(1)) if (m := re.search(r"^\[\s*%s\s*\] (\d+) test" % k, t, re.M)) else 0
              for k in ("PASSED", "FAILED", "SKIPPED")}
    counts["failed_tests"] = sorted(set(re.findall(r"^\[\s*FAILED\s*\] (\S+\.\S+)", t, re.M)))
    return counts
s = {"gpu": open(os.path.join(out, "gpu.txt")).read().strip(), "build_s": build_s, "total_s": total_s,
     "tests": {n: tests(n) for n in ("test_ops_device", "test_device")}, "tests_ok": tests_rc == 0, "bench": {},
     "skipped": skipped}
for f in ("bf16", "int8", "f16"):
    p = os.path.join(out, "bench_%s.json" % f)
    if not os.path.exists(p): continue
    j = json.load(open(p))
    st = j["stages"]
    s["bench"][f] = {"caption_30_tokens_s": st["total_per_caption"]["median_s"], "vision_s": st["vision"]["median_s"],
                     "decode_per_token_s": st["decode_per_token"]["median_s"],
                     "decode_fraction_of_floor": j["floors"]["decode_fraction_of_floor"],
                     "gpu": j.get("gpu"), "load_s": j["memory"]["load_s"], "sweep": j.get("sweep")}
print(json.dumps(s, indent=1))
PY
