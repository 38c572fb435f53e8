#!/usr/bin/env bash
# Installs the tools the tests check the proxy's output with: promtool, from Debian's
# `prometheus` package (tests/unit/test_metrics.py runs `promtool check metrics`).
# Only the promtool binary is taken (into .cache/bin/): installing the package whole
# would also install, and on some machines start, a Prometheus server. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.cache/bin
if command -v promtool >/dev/null 2>&1 || [[ -x $BIN/promtool ]]; then
    echo "test-deps: promtool present"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch() { (cd "$tmp" && apt-get download -q=2 prometheus) >/dev/null 2>&1; }
if ! fetch; then
    # A fresh machine's package lists may be missing or stale.
    if [[ $(id -u) -ne 0 ]]; then
        echo "test-deps: cannot download Debian's prometheus package (apt-get update needs root)" >&2
        exit 1
    fi
    apt-get update -qq
    fetch || { echo "test-deps: apt-get download prometheus failed" >&2; exit 1; }
fi
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
mkdir -p "$BIN"
install -m 0755 "$tmp/x/usr/bin/promtool" "$BIN/promtool"
echo "test-deps: promtool $("$BIN/promtool" --version 2>&1 | head -1 | awk '{print $3}') from Debian's prometheus package, in $BIN"
