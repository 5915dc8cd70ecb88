#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, the sandbox tests
# and the end-to-end tests against a real RocketMQ broker on 127.0.0.1.
# Installs what is missing first (the wasm32-wasip2 target, and the RocketMQ
# name server and broker, cached by version outside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt" >&2
cargo fmt --all --check
(cd plugins && cargo fmt --all --check)

echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
(cd plugins && cargo clippy --target wasm32-wasip2 --release --target-dir ../target --quiet -- -D warnings)

echo "== cargo test" >&2
cargo test --workspace
