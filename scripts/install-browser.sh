#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver (packages chromium and
# chromium-driver) for the status page's browser test, unless they are
# there. Needs root (or sudo) and Debian's package registry.
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi
as_root=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "installing chromium needs root or sudo" >&2; exit 1; }
    as_root=(sudo)
fi
echo "== apt-get install chromium chromium-driver" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq >&2
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
