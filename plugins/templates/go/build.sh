#!/usr/bin/env bash
# Builds {{wasm}}: mainline Go (GOOS=wasip1, a reactor module), then
# wasm-tools makes the component (the contract in wit/ embedded, WASI
# preview1 adapted to the interfaces mqplug links). wasm-tools and the
# adapter are the ones scripts/install-guest-tools.sh of mqplug installs.
set -euo pipefail
cd "$(dirname "$0")"
CACHE_ROOT="${MQPLUG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mqplug}"
WASM_TOOLS="${WASM_TOOLS:-$CACHE_ROOT/wasm-tools-{{wasm_tools_version}}/bin/wasm-tools}"
ADAPTER="${ADAPTER:-$CACHE_ROOT/wasi-preview1-adapter-{{wasmtime_version}}/wasi_snapshot_preview1.reactor.wasm}"
for tool in "$WASM_TOOLS" "$ADAPTER"; do
    if [[ ! -f "$tool" ]]; then
        echo "no $tool: run scripts/install-guest-tools.sh in a checkout of mqplug (or set WASM_TOOLS and ADAPTER)" >&2
        exit 1
    fi
done
# -checklinkname=0: the SDK's runtime allocates with runtime.sbrk before the
# Go runtime has started.
GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -trimpath -ldflags=-checklinkname=0 -o {{wasm}}.core .
"$WASM_TOOLS" component embed wit --world plugin-with-state {{wasm}}.core -o {{wasm}}.core
"$WASM_TOOLS" component new {{wasm}}.core --adapt "wasi_snapshot_preview1=$ADAPTER" -o {{wasm}}
rm {{wasm}}.core
