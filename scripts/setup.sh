#!/usr/bin/env bash
# Installs what mqplug's build, tests and demo need, skipping what is there:
# the wasm32-wasip2 Rust target, the RocketMQ name server and broker (Apache
# RocketMQ from Maven Central unless MQPLUG_BROKER=rust), the Go peers,
# Chromium for the browser test, Redis for the tests that need one.
set -euo pipefail
cd "$(dirname "$0")/.."

# The toolchain rust-toolchain.toml names (with its components and the
# wasm32-wasip2 target), in rustup's own cache, keyed by version.
if ! rustup toolchain list | grep -q "^$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)-"; then
    echo "== rustup toolchain install (rust-toolchain.toml)" >&2
    rustup toolchain install
fi
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "== rustup target add wasm32-wasip2" >&2
    rustup target add wasm32-wasip2
fi
if ! rustup component list --installed | grep -q '^clippy'; then
    rustup component add clippy rustfmt
fi
bin=$(bash scripts/install-rocketmq.sh)
echo "RocketMQ (${MQPLUG_BROKER:-java}): $bin" >&2
# Debian's Chromium and ChromeDriver, for the status page's browser test,
# and Redis, for the tests that run a real one.
bash scripts/install-debian-packages.sh
# componentize-py and componentize-js, for the Python and JavaScript plugins.
bash scripts/install-guest-tools.sh >/dev/null
# The platform's Go clients, test peers: their modules from the Go module
# proxy, cached in Go's own module cache outside the checkout.
command -v go >/dev/null || { echo "Go is needed for the platform's client test peers (tests/peers/go)" >&2; exit 1; }
(cd tests/peers/go && go mod download)
# The OpenTelemetry Collector the trace tests export to (tests/peers/otelcol)
# is built by those tests with `go build`, which fetches only the modules it
# compiles (`go mod download` would fetch its whole graph, 500 MB).
