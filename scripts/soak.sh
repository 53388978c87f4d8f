#!/usr/bin/env bash
# Soak test of the server (not in CI): builds bench/soak_server (Release) and runs it for MINUTES (default 10)
# over loopback: mixed valid, invalid, streamed, disconnecting, slow and pipelined clients, bodies at the limits.
# Exits non-zero on any unexpected answer or RSS growth after warm-up. Usage: scripts/soak.sh [MINUTES] [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
shift || true
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "${JOBS:-$(nproc)}" --target soak_server
exec build/soak_server --minutes "$minutes" "$@"
