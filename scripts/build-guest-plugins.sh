#!/usr/bin/env bash
# Builds the Python and JavaScript example plugins into wasm components:
#   plugins/python/reward_logger/app.py      -> OUT/reward_logger_py.wasm (componentize-py)
#   plugins/js/reward-logger/reward-logger.js -> OUT/reward_logger_js.wasm (componentize-js)
# OUT defaults to target/guest-plugins. A component newer than its sources and
# the WIT is kept. Installs the tools on first use (scripts/install-guest-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/guest-plugins}"
mkdir -p "$OUT"

{ read -r componentize_py; read -r node_modules; } < <(bash scripts/install-guest-tools.sh)

# up_to_date OUTPUT SOURCE...: the output exists and is newer than every source.
up_to_date() {
    local output=$1
    shift
    [[ -f "$output" ]] || return 1
    [[ -z "$(find "$@" -newer "$output" -type f | head -1)" ]]
}

py_out="$OUT/reward_logger_py.wasm"
if ! up_to_date "$py_out" plugins/python/reward_logger wit; then
    echo "== componentize-py: $py_out" >&2
    # --stub-wasi: the component imports no WASI at all, only mqplug's log.
    "$componentize_py" -d wit -w plugin componentize --stub-wasi \
        -p plugins/python/reward_logger app -o "$py_out.tmp" >&2
    mv "$py_out.tmp" "$py_out"
fi

js_out="$OUT/reward_logger_js.wasm"
if ! up_to_date "$js_out" plugins/js wit; then
    echo "== componentize-js: $js_out" >&2
    NODE_PATH="$node_modules" node plugins/js/componentize.mjs \
        plugins/js/reward-logger/reward-logger.js "$js_out.tmp"
    mv "$js_out.tmp" "$js_out"
fi
echo "$py_out"
echo "$js_out"
