#!/usr/bin/env bash
# The CPU kernels on 64-bit ARM (Jetson's CPUs), from an x86-64 machine: cross-compiles the
# kernels crate for aarch64-unknown-linux-gnu, lints it, and runs its CPU tests under
# qemu-user with every ARM feature on (`-cpu max`, which has `dotprod`), so the NEON
# integer-dot kernel is checked against the exact value and the scalar path like the x86
# kernels are; then, with the real model, the aarch64 binary against the x86 one. Installs what it needs: the Rust target (rustup), the aarch64 linker and
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
# The aarch64 builds without debug info: nothing debugs them here, and they compile the
# whole engine a second time (the x86 build below is the test suite's, debug info and all).
arm_cargo() { CARGO_PROFILE_RELEASE_DEBUG=false cargo "$@"; }
arm_cargo clippy --release --target "$target" --workspace --all-targets -- -D warnings
arm_cargo test --release --target "$target" -p vellum-kernels --lib cpu::

# End to end on the real model (scripts/fetch-model.sh), when it is there: the aarch64 binary
# (NEON integer dots, int16 activations) against the x86 one on the float path, per-token
# log-probabilities of a paragraph, and the greedy chat answer.
model="${VELLUM_MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [[ ! -f "$model" ]]; then
  echo "test-aarch64.sh: $model missing (scripts/fetch-model.sh): end-to-end check skipped" >&2
  exit 0
fi
cargo build --release -p vellum
arm_cargo build --release --target "$target" -p vellum
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -c 'import json; print(json.dumps({"text": open("tests/data/public-domain.txt").read()[:1500]}))' >"$tmp/in.jsonl"
arm=(qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu max "target/$target/release/vellum")
# An f32 KV cache on both sides: this checks the kernels, and an f16 cache's rounding turns
# their 1e-6 differences into whole f16 steps of K and V (1.5e-2 here, 2026-12-04).
VELLUM_INT_DOT=0 target/release/vellum score -q --kv-dtype f32 --token-logprobs --model "$model" --input "$tmp/in.jsonl" >"$tmp/x86.jsonl"
RUST_LOG=info "${arm[@]}" score -q --kv-dtype f32 --token-logprobs --model "$model" --input "$tmp/in.jsonl" >"$tmp/arm.jsonl" 2>"$tmp/arm.log"
grep -q 'backend="cpu-neon-dotprod-int16dot"' "$tmp/arm.log" || { cat "$tmp/arm.log" >&2; echo "test-aarch64.sh: not the NEON int16 path" >&2; exit 1; }
python3 - "$tmp/x86.jsonl" "$tmp/arm.jsonl" <<'PY'
import json, sys
x86, arm = (json.loads(open(f).readline())["token_logprobs"] for f in sys.argv[1:])
assert len(x86) == len(arm) > 200, (len(x86), len(arm))
worst = max(abs(a - b) for a, b in zip(x86, arm))
print(f"aarch64 (NEON, int16) vs x86 (float): {len(arm)} tokens, max |d logprob| {worst:.2e}")
# The x86 int16 path is held to 5e-3 of transformers (tests/golden.rs); the two builds'
# attention and f32 code differ too.
assert worst < 1e-2, worst
PY
# The default (f16) KV cache here.
answer="$("${arm[@]}" generate -q --model "$model" --chat --prompt "What is the capital of France?" --max-tokens 12 --temperature 0)"
echo "aarch64 chat answer: $answer"
[[ "$answer" == *Paris* ]] || { echo "test-aarch64.sh: expected Paris" >&2; exit 1; }
