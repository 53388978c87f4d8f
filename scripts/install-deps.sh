#!/usr/bin/env bash
# Installs the Debian 12 packages needed to build and test blip2. Run as root (or with sudo).
set -euo pipefail
packages=(
  g++ cmake ninja-build pkg-config        # toolchain (g++ 12, cmake 3.25)
  libopenblas-dev                         # matrix products
  libdnnl-dev                             # oneDNN: bench_onednn compares its matmul with ours (not linked by blip2)
  libsentencepiece-dev                    # T5 tokenizer
  libpcre2-dev                            # Unicode regex for the OPT (GPT-2 BPE) tokenizer
  libicu-dev                              # Unicode properties and normalisation for the BERT tokenizer
  libpng-dev libjpeg62-turbo-dev          # image decoding (libjpeg-turbo: the decoder Pillow uses)
  libwebp-dev                             # WebP images (libwebp: the decoder Pillow uses)
  nlohmann-json3-dev libcli11-dev         # JSON, command line
  libcpp-httplib-dev libssl-dev           # HTTP server (blip2 serve); SHA-256 of images
  libgtest-dev                            # tests
  curl chromium                           # server tests: the curl script, the page in headless Chromium
  iproute2                                # server tests: ss shows the listen backlog
  clang libclang-rt-dev                   # fuzzing (scripts/fuzz.sh): clang 14 and its libFuzzer runtime
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
