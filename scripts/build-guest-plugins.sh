#!/usr/bin/env bash
# Builds the Python and JavaScript example plugins into wasm components:
#   plugins/python/reward_logger/app.py          -> OUT/reward_logger_py.wasm  (componentize-py)
#   plugins/js/reward-logger/reward-logger.js    -> OUT/reward_logger_js.wasm  (componentize-js)
#   plugins/python/reward_granter/app.py         -> OUT/reward_granter_py.wasm (componentize-py)
#   plugins/js/reward-granter/reward-granter.js  -> OUT/reward_granter_js.wasm (componentize-js)
#   plugins/go/reward-logger                     -> OUT/reward_logger_go.wasm  (go, wasm-tools)
#   plugins/go/testing/failures                  -> OUT/failures_go.wasm       (go, wasm-tools)
#   plugins/go/reward-granter                    -> OUT/reward_granter_go.wasm (go, wasm-tools)
# and prints their paths, one a line, in this order. OUT defaults to
# target/guest-plugins. A component newer than its sources and the WIT is
# kept. Installs the tools on first use (scripts/install-guest-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/guest-plugins}"
mkdir -p "$OUT"

{
    read -r componentize_py
    read -r node_modules
    read -r wasm_tools
    read -r adapter
} < <(bash scripts/install-guest-tools.sh)

# up_to_date OUTPUT SOURCE...: the output exists and is newer than every source.
up_to_date() {
    local output=$1
    shift
    [[ -f "$output" ]] || return 1
    [[ -z "$(find "$@" -newer "$output" -type f | head -1)" ]]
}

# python_plugin OUTPUT FOLDER [FLAG...]: componentize-py, the app module `app`.
python_plugin() {
    local output=$1 folder=$2
    shift 2
    if ! up_to_date "$output" "$folder" wit; then
        echo "== componentize-py: $output" >&2
        "$componentize_py" -d wit -w plugin componentize "$@" \
            -p "$folder" app -o "$output.tmp" >&2
        mv "$output.tmp" "$output"
    fi
}

# js_plugin OUTPUT SOURCE [FEATURE,...]: componentize-js, every optional
# feature disabled but the ones named (plugins/js/componentize.mjs).
js_plugin() {
    local output=$1 source=$2
    shift 2
    if ! up_to_date "$output" "$(dirname "$source")" plugins/js/componentize.mjs wit; then
        echo "== componentize-js: $output" >&2
        NODE_PATH="$node_modules" node plugins/js/componentize.mjs "$source" "$output.tmp" "$@"
        mv "$output.tmp" "$output"
    fi
}

# go_plugin OUTPUT FOLDER: mainline Go (GOOS=wasip1, a reactor module through
# -buildmode=c-shared), then the component: the contract's world embedded,
# and WASI preview1 adapted to the preview2 interfaces mqplug links.
# -checklinkname=0: the bindings' runtime allocates with runtime.sbrk before
# the Go runtime has started (the adapter asks for memory in _initialize).
go_plugin() {
    local output=$1 folder=$2
    if ! up_to_date "$output" "$folder" plugins/go/sdk; then
        echo "== go: $output" >&2
        local core="$output.core.wasm"
        (cd "$folder" && GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -trimpath \
            -ldflags=-checklinkname=0 -o "$core" .) >&2
        "$wasm_tools" component embed wit --world plugin-with-state "$core" -o "$core" >&2
        "$wasm_tools" component new "$core" --adapt "wasi_snapshot_preview1=$adapter" \
            -o "$output.tmp" >&2
        rm -f "$core"
        mv "$output.tmp" "$output"
    fi
}

# --stub-wasi: the component imports no WASI at all, only mqplug's log.
python_plugin "$OUT/reward_logger_py.wasm" plugins/python/reward_logger --stub-wasi
js_plugin "$OUT/reward_logger_js.wasm" plugins/js/reward-logger/reward-logger.js

# No --stub-wasi here: it replaces *every* wasi:* import with a trapping stub,
# the world's own wasi:config/store and wasi:http ones too (the first
# store.get traps), and componentize-py has no flag to stub only some. So this
# component also imports the WASI interfaces CPython's libc links (wasi:cli,
# wasi:filesystem, wasi:sockets, wasi:random, wall clock), which mqplug links
# granting nothing: no files, no environment, no sockets.
python_plugin "$OUT/reward_granter_py.wasm" plugins/python/reward_granter
# No feature: the plugin calls the world's wasi:http imports itself (see its
# header for why not fetch, which needs the `http` feature).
js_plugin "$OUT/reward_granter_js.wasm" plugins/js/reward-granter/reward-granter.js
go_plugin "$(realpath "$OUT")/reward_logger_go.wasm" plugins/go/reward-logger
go_plugin "$(realpath "$OUT")/failures_go.wasm" plugins/go/testing/failures
go_plugin "$(realpath "$OUT")/reward_granter_go.wasm" plugins/go/reward-granter

echo "$OUT/reward_logger_py.wasm"
echo "$OUT/reward_logger_js.wasm"
echo "$OUT/reward_granter_py.wasm"
echo "$OUT/reward_granter_js.wasm"
echo "$OUT/reward_logger_go.wasm"
echo "$OUT/failures_go.wasm"
echo "$OUT/reward_granter_go.wasm"
