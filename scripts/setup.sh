#!/usr/bin/env bash
# Installs what mqplug's build, tests and demo need, skipping what is there:
# the wasm32-wasip2 Rust target and the RocketMQ name server and broker.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "== rustup target add wasm32-wasip2" >&2
    rustup target add wasm32-wasip2
fi
if ! rustup component list --installed | grep -q '^clippy'; then
    rustup component add clippy rustfmt
fi
bin=$(bash scripts/install-rocketmq.sh)
echo "RocketMQ binaries: $bin" >&2
# componentize-py and componentize-js, for the Python and JavaScript plugins.
bash scripts/install-guest-tools.sh >/dev/null
