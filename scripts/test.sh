#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, integration, golden,
# bad input, CLI, CUDA kernels under the CPU emulator) in release mode. The real model must
# be fetched first (scripts/fetch-model.sh); the golden tests fail, not skip, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVRTC from scripts/install-nvrtc.sh, when installed: the CUDA kernels' compile test uses it
# (it skips, visibly, without it unless VELLUM_REQUIRE_NVRTC is set).
nvrtc_lib="${VELLUM_CACHE:-$PWD/.cache}/nvidia/nvidia/cu13/lib"
if [[ -d "$nvrtc_lib" ]]; then
  export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
cargo fmt --all -- --check
cargo clippy --all-targets --release -- -D warnings
cargo test --release --workspace
