#!/usr/bin/env bash
# Installs embedtl and everything its demo (and, with --dev, its tests) need, on a fresh
# Debian/Ubuntu machine: the Debian data packages, then the Python package. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

apt_pkgs=(tuxpaint-stamps-default)            # the demo data
[ "$dev" = 1 ] && apt_pkgs+=(dataset-fashion-mnist chromium)   # test and benchmark data, the browser tests

missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "setup: please install the Debian packages ${missing[*]} (or their files) by hand" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e ".$([ "$dev" = 1 ] && echo '[dev]' || echo '[serve]')"
