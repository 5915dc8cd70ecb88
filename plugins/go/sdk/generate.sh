#!/usr/bin/env bash
# Regenerates the Go SDK's bindings from ../../../wit (world
# plugin-with-state), committed so that an author needs no generator:
#   wit/             the generated packages (wit-bindgen-cli's `go` generator)
#   internal/witgo/  the runtime they use, go.bytecodealliance.org/pkg's
#                    `wit/runtime` and `wit/types`: its v0.4.0 is not on the
#                    Go module proxy, so the copy inside the wit-bindgen-go
#                    crate's sources is used, imported under this module.
#                    `types` is copied; `runtime` is mqplug's changed copy
#                    (see its package comment), kept here, not regenerated.
# wit-bindgen-cli is installed on first use, cached by version.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=0.63.0
CACHE_ROOT="${MQPLUG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mqplug}"
PREFIX="$CACHE_ROOT/wit-bindgen-cli-$VERSION"
if [[ ! -x "$PREFIX/bin/wit-bindgen" ]]; then
    echo "installing wit-bindgen-cli $VERSION (go generator) into $PREFIX" >&2
    cargo install --locked --quiet --root "$PREFIX" "wit-bindgen-cli@$VERSION" \
        --no-default-features --features go >&2
fi

rm -rf wit internal/witgo/types
"$PREFIX/bin/wit-bindgen" go ../../../wit --world plugin-with-state \
    --pkg-name mqplug/sdk/wit --out-dir wit --quiet >&2
# The exported handler: the SDK's, which calls the function given to
# mqplug.Handle.
mkdir -p wit/exports/export_mqplug_plugin_handler
cp handler_export.go.txt wit/exports/export_mqplug_plugin_handler/handle.go

# The crate's sources, from Cargo's download cache (fetched if missing).
archive() {
    ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"wit-bindgen-go-$VERSION.crate" 2>/dev/null | head -1
}
if [[ -z "$(archive)" ]]; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    mkdir -p "$scratch/src"
    printf '[package]\nname = "fetch-go-runtime"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nwit-bindgen-go = "=%s"\n' \
        "$VERSION" > "$scratch/Cargo.toml"
    touch "$scratch/src/lib.rs"
    (cd "$scratch" && cargo fetch --quiet >&2)
fi
unpacked="$(mktemp -d)"
tar -xzf "$(archive)" -C "$unpacked"
crate="$unpacked/wit-bindgen-go-$VERSION"
mkdir -p internal/witgo
cp -r "$crate/src/pkg/wit/types" internal/witgo/
cp "$crate/src/pkg/LICENSE" internal/witgo/LICENSE
rm -rf "$unpacked"
# Streams and futures need the async ABI, which the contract does not use.
rm internal/witgo/types/future.go internal/witgo/types/stream.go
grep -rl 'go.bytecodealliance.org/pkg/wit/' wit internal | xargs sed -i \
    's#go.bytecodealliance.org/pkg/wit/#mqplug/sdk/internal/witgo/#g'
gofmt -l wit internal >/dev/null
echo "regenerated wit/ and internal/witgo/" >&2
