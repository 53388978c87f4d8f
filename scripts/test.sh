#!/usr/bin/env bash
# Builds and runs the whole test suite twice: a Release build, then a build with AddressSanitizer and
# UndefinedBehaviorSanitizer; then, where clang is installed, a bounded run of every fuzz target
# (BLIP2_FUZZ_SECONDS each, default 20). Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

echo "== Release build and tests"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"
(cd build && ctest --output-on-failure -j "$jobs")

# The CUDA backend must keep compiling wherever the toolkit is (CI's machines have it, without a GPU): its
# device tests run on the emulated device, and its GPU tests skip, saying so.
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ -x "$nvcc" ]; then
  echo "== CUDA build (-DBLIP2_CUDA=ON) and its device tests"
  cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DBLIP2_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" >/dev/null
  cmake --build build-cuda -j "$jobs" --target blip2 test_device test_ops_device
  (cd build-cuda && ctest --output-on-failure -j "$jobs" -R "Device|OpsOnGpu")
else
  echo "== CUDA build skipped: no CUDA toolkit (nvcc) on this machine"
fi

echo "== ASan + UBSan build and tests"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBLIP2_SANITIZE=ON >/dev/null
cmake --build build-asan -j "$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ctest --output-on-failure -j "$jobs")

# The fuzz targets (docs/FUZZING.md), each from its seeds for a bounded time: a crash, leak, UB, timeout or
# runaway allocation fails the run. Needs clang (scripts/install-deps.sh installs it).
if command -v clang++ >/dev/null; then
  echo "== Fuzz targets, ${BLIP2_FUZZ_SECONDS:-20} s each"
  JOBS=$jobs ./scripts/fuzz.sh "${BLIP2_FUZZ_SECONDS:-20}"
else
  echo "== Fuzzing skipped: no clang++ on this machine"
fi
