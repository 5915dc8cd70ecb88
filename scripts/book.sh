#!/usr/bin/env bash
# Builds the book (docs/) into target/book and checks its links: every
# relative link and picture in the built pages resolves, every #anchor names
# a heading; the repository's top-level pages are checked as a repository
# browser shows them.
#
# mdBook (crates.io) is installed once per version, cached outside the
# checkout like the other tools. The book's chapters "Reliability" and
# "Benchmarks" are RELIABILITY.md and BENCHMARKS.md themselves, copied in
# with their links made relative to the book.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

MDBOOK_VERSION="${MDBOOK_VERSION:-0.5.4}"
CACHE_ROOT="${MQPLUG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mqplug}"
MDBOOK_PREFIX="$CACHE_ROOT/mdbook-$MDBOOK_VERSION"
if [[ ! -x "$MDBOOK_PREFIX/bin/mdbook" ]]; then
    echo "installing mdbook $MDBOOK_VERSION into $MDBOOK_PREFIX (a few minutes)" >&2
    CARGO_TARGET_DIR="$CACHE_ROOT/build/mdbook-$MDBOOK_VERSION" \
        cargo install --locked --quiet --root "$MDBOOK_PREFIX" "mdbook@$MDBOOK_VERSION" \
        --no-default-features >&2
    rm -rf "$CACHE_ROOT/build/mdbook-$MDBOOK_VERSION"
fi

# The book's source as mdBook reads it: docs/ with the two top-level pages
# in place of their placeholders. It sits beside examples/ (a link), so
# docs' relative includes (../examples/mqplug.toml) read the same files.
STAGE="$ROOT/target/book-src"
rm -rf "$STAGE" "$ROOT/target/book"
mkdir -p "$STAGE"
cp -r docs "$STAGE/docs"
ln -s "$ROOT/examples" "$STAGE/examples"
for page in RELIABILITY BENCHMARKS; do
    lower=$(echo "$page" | tr '[:upper:]' '[:lower:]')
    sed -e 's#](docs/#](#g' \
        -e 's#](RELIABILITY\.md#](reliability.md#g' \
        -e 's#](BENCHMARKS\.md#](benchmarks.md#g' \
        "$page.md" >"$STAGE/docs/$lower.md"
done
"$MDBOOK_PREFIX/bin/mdbook" build "$STAGE/docs" --dest-dir "$ROOT/target/book" >&2

broken=0
python3 scripts/check-links.py html target/book || broken=1
python3 scripts/check-links.py markdown README.md ARCHITECTURE.md RELIABILITY.md \
    BENCHMARKS.md CHANGELOG.md docs/*.md docs/*/*.md || broken=1
if ((broken)); then
    echo "the book or the top-level pages have broken links (above)" >&2
    exit 1
fi
echo "book: target/book/index.html" >&2
