#!/usr/bin/env bash
# Downloads (does not install) the Debian 12 packages the build needs into .gpu-deps/, for a GPU machine that
# has CUDA, a C++ compiler, CMake and ninja but no Debian archive to install from. scripts/gpu-check.sh
# unpacks them there into a private root (no system change). Run here, where the archive is reachable; the
# folder is git-ignored and travels with the working tree (about 25 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(
  libopenblas-dev libopenblas-pthread-dev libopenblas0 libopenblas0-pthread libgfortran5 libquadmath0
  libsentencepiece-dev libsentencepiece0 libprotobuf-lite32
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3
  libpng-dev libpng16-16 zlib1g-dev zlib1g
  libjpeg62-turbo-dev libjpeg62-turbo
  nlohmann-json3-dev libcli11-dev
  libcpp-httplib-dev libcpp-httplib0.11 libbrotli-dev libbrotli1 libssl-dev libssl3
  libgtest-dev googletest
  pkgconf pkgconf-bin libpkgconf3
)
mkdir -p .gpu-deps
[ -f .git/info/exclude ] && ! grep -qx '/.gpu-deps/' .git/info/exclude && echo '/.gpu-deps/' >> .git/info/exclude
cd .gpu-deps
apt-get download "${packages[@]}"
du -sh .
