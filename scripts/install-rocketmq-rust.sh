#!/usr/bin/env bash
# Installs the Rust RocketMQ name server and broker binaries, once per version.
#
# The binaries are cached outside the checkout, keyed by version, so a second
# run (and every test run after the first) costs nothing. Prints the bin
# directory on stdout; progress goes to stderr.
set -euo pipefail

ROCKETMQ_VERSION="${ROCKETMQ_VERSION:-1.0.0}"
CACHE_ROOT="${MQPLUG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mqplug}"
PREFIX="$CACHE_ROOT/rocketmq-$ROCKETMQ_VERSION"
BIN="$PREFIX/bin"

if [[ -x "$BIN/rocketmq-namesrv-rust" && -x "$BIN/rocketmq-broker-rust" ]]; then
    echo "$BIN"
    exit 0
fi

echo "installing rocketmq-namesrv and rocketmq-broker $ROCKETMQ_VERSION into $PREFIX (first run only: 10-30 minutes)" >&2
mkdir -p "$PREFIX"
# One target directory for both crates: they share most of their dependencies.
CARGO_TARGET_DIR="$CACHE_ROOT/rocketmq-build-$ROCKETMQ_VERSION" \
    cargo install --locked --root "$PREFIX" \
    "rocketmq-namesrv@$ROCKETMQ_VERSION" "rocketmq-broker@$ROCKETMQ_VERSION" >&2
# The intermediate build directory is large and no longer needed.
rm -rf "$CACHE_ROOT/rocketmq-build-$ROCKETMQ_VERSION"
echo "$BIN"
