#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, integration, golden,
# bad input, CLI) in release mode. The real model must be fetched first
# (scripts/fetch-model.sh); the golden tests fail, not skip, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --release -- -D warnings
cargo test --release --workspace
