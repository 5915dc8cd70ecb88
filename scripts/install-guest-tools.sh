#!/usr/bin/env bash
# Installs the tools that build Python, JavaScript and Go plugins, once per
# version, cached outside the checkout: componentize-py (PyPI) in a
# virtualenv, @bytecodealliance/componentize-js (npm) in a node_modules
# folder, wasm-tools (crates.io, only its component commands) and the WASI
# preview1 reactor adapter that matches the host's wasmtime (from the crate
# wasi-preview1-component-adapter-provider). Go itself is the machine's.
#
# Prints four lines on stdout: the componentize-py executable, the
# componentize-js node_modules folder, the wasm-tools executable and the
# adapter. Progress goes to stderr.
set -euo pipefail

COMPONENTIZE_PY_VERSION="${COMPONENTIZE_PY_VERSION:-0.25.1}"
COMPONENTIZE_JS_VERSION="${COMPONENTIZE_JS_VERSION:-0.23.0}"
WASM_TOOLS_VERSION="${WASM_TOOLS_VERSION:-1.263.0}"
# The adapter is built with wasmtime: the same version as the host's.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WASMTIME_VERSION="$(awk '/^name = "wasmtime"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$ROOT/Cargo.lock")"
CACHE_ROOT="${MQPLUG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mqplug}"

PY_PREFIX="$CACHE_ROOT/componentize-py-$COMPONENTIZE_PY_VERSION"
if [[ ! -f "$PY_PREFIX/.complete" ]]; then
    echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $PY_PREFIX" >&2
    rm -rf "$PY_PREFIX"
    python3 -m venv "$PY_PREFIX"
    "$PY_PREFIX/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION" >&2
    touch "$PY_PREFIX/.complete"
fi

JS_PREFIX="$CACHE_ROOT/componentize-js-$COMPONENTIZE_JS_VERSION"
if [[ ! -f "$JS_PREFIX/.complete" ]]; then
    echo "installing @bytecodealliance/componentize-js $COMPONENTIZE_JS_VERSION into $JS_PREFIX" >&2
    rm -rf "$JS_PREFIX"
    mkdir -p "$JS_PREFIX"
    (cd "$JS_PREFIX" && npm init -y >/dev/null &&
        npm install --silent --no-audit --no-fund \
            "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION" >&2)
    touch "$JS_PREFIX/.complete"
fi

WASM_TOOLS_PREFIX="$CACHE_ROOT/wasm-tools-$WASM_TOOLS_VERSION"
if [[ ! -x "$WASM_TOOLS_PREFIX/bin/wasm-tools" ]]; then
    echo "installing wasm-tools $WASM_TOOLS_VERSION into $WASM_TOOLS_PREFIX (a few minutes)" >&2
    CARGO_TARGET_DIR="$CACHE_ROOT/build/wasm-tools-$WASM_TOOLS_VERSION" \
        cargo install --locked --quiet --root "$WASM_TOOLS_PREFIX" "wasm-tools@$WASM_TOOLS_VERSION" \
        --no-default-features --features component,validate,print,metadata >&2
    rm -rf "$CACHE_ROOT/build/wasm-tools-$WASM_TOOLS_VERSION"
fi

ADAPTER="$CACHE_ROOT/wasi-preview1-adapter-$WASMTIME_VERSION/wasi_snapshot_preview1.reactor.wasm"
if [[ ! -f "$ADAPTER" ]]; then
    echo "fetching the WASI preview1 reactor adapter of wasmtime $WASMTIME_VERSION" >&2
    crate=wasi-preview1-component-adapter-provider
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    mkdir -p "$scratch/src"
    printf '[package]\nname = "fetch-adapter"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n%s = "=%s"\n' \
        "$crate" "$WASMTIME_VERSION" > "$scratch/Cargo.toml"
    touch "$scratch/src/lib.rs"
    (cd "$scratch" && cargo fetch --quiet >&2)
    archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$WASMTIME_VERSION.crate" | head -1)"
    mkdir -p "$(dirname "$ADAPTER")"
    tar -xzf "$archive" -O "$crate-$WASMTIME_VERSION/artefacts/wasi_snapshot_preview1.reactor.wasm" > "$ADAPTER.tmp"
    mv "$ADAPTER.tmp" "$ADAPTER"
fi

echo "$PY_PREFIX/bin/componentize-py"
echo "$JS_PREFIX/node_modules"
echo "$WASM_TOOLS_PREFIX/bin/wasm-tools"
echo "$ADAPTER"
