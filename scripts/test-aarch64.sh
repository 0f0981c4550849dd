#!/usr/bin/env bash
# The CPU kernels on 64-bit ARM (Jetson's CPUs), from an x86-64 machine: cross-compiles the
# kernels crate for aarch64-unknown-linux-gnu, lints it, and runs its CPU tests under
# qemu-user with every ARM feature on (`-cpu max`, which has `dotprod`), so the NEON
# integer-dot kernel is checked against the exact value and the scalar path like the x86
# kernels are. Installs what it needs: the Rust target (rustup), the aarch64 linker and
# qemu-user (apt-get, as root). Where those cannot be installed it says so and skips,
# unless VELLUM_REQUIRE_AARCH64=1 (then it fails). On an ARM machine, `cargo test` runs the
# same tests natively.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

skip() {
  if [[ "${VELLUM_REQUIRE_AARCH64:-0}" == 1 ]]; then
    echo "test-aarch64.sh: $1 (VELLUM_REQUIRE_AARCH64=1: failing)" >&2
    exit 1
  fi
  echo "test-aarch64.sh: SKIPPED, $1: the NEON kernels were not tested" >&2
  exit 0
}

if [[ "$(uname -m)" == "aarch64" ]]; then
  exec cargo test --release -p vellum-kernels --lib cpu::
fi
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target" >&2 || skip "rustup could not add $target"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null || skip "not root: cannot apt-get the aarch64 linker and qemu-user"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null; } \
    || skip "apt-get could not install gcc-aarch64-linux-gnu and qemu-user"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu max"
cargo clippy --release --target "$target" --workspace --all-targets -- -D warnings
cargo test --release --target "$target" -p vellum-kernels --lib cpu::
