#!/usr/bin/env bash
# Installs the tools that build Python and JavaScript plugins, once per version:
# componentize-py (PyPI) in a virtualenv and @bytecodealliance/componentize-js
# (npm) in a node_modules folder, both cached outside the checkout.
#
# Prints two lines on stdout: the componentize-py executable and the
# componentize-js node_modules folder. Progress goes to stderr.
set -euo pipefail

COMPONENTIZE_PY_VERSION="${COMPONENTIZE_PY_VERSION:-0.25.1}"
COMPONENTIZE_JS_VERSION="${COMPONENTIZE_JS_VERSION:-0.23.0}"
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

echo "$PY_PREFIX/bin/componentize-py"
echo "$JS_PREFIX/node_modules"
