#!/usr/bin/env bash
# Installs the Debian packages the tests need, unless they are there:
# Chromium and ChromeDriver (packages chromium and chromium-driver) for the
# status page's browser test, Redis (package redis-server) for the tests
# that run a real Redis, and DejaVu Sans (fonts-dejavu-core) for the
# benchmarks' charts. Only the missing packages, in one apt-get call.
# Needs root (or sudo) and Debian's package registry.
set -euo pipefail
# Each package, with the file that shows it is installed.
packages=(
    chromium:/usr/bin/chromium
    chromium-driver:/usr/bin/chromedriver
    redis-server:/usr/bin/redis-server
    fonts-dejavu-core:/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
)
missing=()
for entry in "${packages[@]}"; do
    if [[ ! -e ${entry#*:} ]]; then
        missing+=("${entry%%:*}")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
as_root=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "installing ${missing[*]} needs root or sudo" >&2; exit 1; }
    as_root=(sudo)
fi
echo "== apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq >&2
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
