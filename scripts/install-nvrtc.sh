#!/usr/bin/env bash
# Installs NVRTC, the CUDA run-time compiler, from its pinned PyPI wheel (checksummed) so the
# CUDA kernels can be compiled for every target arch on machines without a GPU or a CUDA
# toolkit (the compile test in kernels/tests/cuda_compile.rs). Idempotent. Prints the
# directory to put on LD_LIBRARY_PATH.
#
# Pinned to 13.0.x: newer NVRTC emits code that a CUDA 13.0 driver rejects. The kernels
# include no CUDA headers (vellum.cuh defines its own 16-bit float types), so the header
# wheel (nvidia-cuda-runtime) is not needed.
set -euo pipefail

PKG="nvidia-cuda-nvrtc==13.0.88"
WHEEL_SHA256="ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575"

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${VELLUM_CACHE:-$root/.cache}/nvidia"
lib="$dest/nvidia/cu13/lib"

if [[ -f "$lib/libnvrtc.so.13" && -f "$lib/.verified-$WHEEL_SHA256" ]]; then
  echo "$lib"
  exit 0
fi
if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "install-nvrtc.sh: the pinned wheel is for x86_64 only; install the CUDA toolkit instead" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $PKG from PyPI ..." >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: --dest "$tmp" "$PKG" >&2
wheel="$(ls "$tmp"/*.whl)"
got="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [[ "$got" != "$WHEEL_SHA256" ]]; then
  echo "install-nvrtc.sh: checksum mismatch for $(basename "$wheel"): $got" >&2
  exit 1
fi
rm -rf "$dest"
mkdir -p "$dest"
python3 -m zipfile -e "$wheel" "$dest"
touch "$lib/.verified-$WHEEL_SHA256"
echo "$lib"
