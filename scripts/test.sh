#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, the sandbox tests
# and the end-to-end tests against a real RocketMQ broker on 127.0.0.1.
# Installs what is missing first (the wasm32-wasip2 target, and the RocketMQ
# name server and broker, cached by version outside the checkout).
#
# Every step runs to the end, and every test binary too (--no-fail-fast), so
# one failure cannot hide the rest; the script lists what failed and exits
# non-zero when anything did.
set -uo pipefail
cd "$(dirname "$0")/.."

# A CI run builds once from nothing: incremental state would only add
# gigabytes to its target directory.
if [[ ${CI:-} == true ]]; then
    export CARGO_INCREMENTAL=0
fi
# The disk's room, at the start and the end: the broker refuses sends when
# the disk under its store is over 90 % used.
disk() { df -h . "${TMPDIR:-/tmp}" /dev/shm 2>/dev/null | sed 's/^/   /' >&2; }
echo "== disk at the start" >&2
disk

bash scripts/setup.sh || exit 1

failed=()
step() {
    local name=$1
    shift
    echo "== $name" >&2
    "$@" || failed+=("$name")
}

step "cargo fmt" cargo fmt --all --check
step "cargo fmt (plugins)" bash -c 'cd plugins && cargo fmt --all --check'
step "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo clippy (plugins)" bash -c 'cd plugins && cargo clippy --target wasm32-wasip2 --release --target-dir ../target --quiet -- -D warnings'
step "go vet and gofmt (plugins/go)" bash -c 'cd plugins/go &&
    test -z "$(gofmt -l sdk/*.go sdk/wasihttp reward-logger reward-granter testing)" &&
    for module in sdk reward-logger reward-granter testing/failures; do
        (cd "$module" && GOOS=wasip1 GOARCH=wasm go vet . $(test -d wasihttp && echo ./wasihttp)) || exit 1
    done'
# The committed bindings are what wit/ generates now (regenerate with
# plugins/go/sdk/generate.sh and commit them).
# Only what the script writes is compared: hand-written SDK files may be
# mid-edit.
generated="plugins/go/sdk/wit plugins/go/sdk/internal/witgo"
step "Go bindings match wit/" bash -c "bash plugins/go/sdk/generate.sh 2>/dev/null &&
    test -z \"\$(git status --porcelain -- $generated)\" ||
    { git status --short -- $generated; false; }"
# The book (docs/, mdBook) builds, and no link in it or in the top-level
# pages is broken.
step "the book and its links" bash scripts/book.sh
step "cargo test" cargo test --workspace --no-fail-fast

echo "== disk at the end" >&2
disk

if ((${#failed[@]})); then
    echo "== failed: ${failed[*]}" >&2
    exit 1
fi
echo "== all passed" >&2
