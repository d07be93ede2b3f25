#!/usr/bin/env bash
# System packages the test suite needs that pip cannot provide (Debian/Ubuntu, apt-get).
#   * chromium (/usr/bin/chromium): tests/test_dashboard.py renders GET /dashboard headlessly.
# Idempotent: installs only what is missing. Run as root (or with sudo available).
set -euo pipefail

CHROMIUM=/usr/bin/chromium

fail() {
    echo "install-system-deps: $*" >&2
    exit 1
}

if [ -x "$CHROMIUM" ]; then
    echo "install-system-deps: chromium already installed ($("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"))"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 \
    || fail "$CHROMIUM is missing and apt-get is not available; install Debian's 'chromium' package (or a Chromium at $CHROMIUM) by hand."

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "installing chromium needs root: run this script as root or install sudo."
    SUDO=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: installing chromium with apt-get"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    || fail "'apt-get update' failed; check the network and the apt sources, then re-run $0."
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
    || fail "'apt-get install chromium' failed (see apt's output above); on Ubuntu the 'chromium' deb may be a snap stub, use a Debian image or install Chromium at $CHROMIUM."

[ -x "$CHROMIUM" ] || fail "apt-get installed 'chromium' but $CHROMIUM is still missing; check the package."
echo "install-system-deps: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
