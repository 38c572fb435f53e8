#!/usr/bin/env bash
# Installs what `dynasorctl bench proxy` drives the load with: Debian's wrk.
# Idempotent: does nothing when wrk is already on PATH. Without root (or apt)
# it says so and exits 0, and the benchmark falls back to its Python load generator.
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
    echo "bench: wrk present ($(command -v wrk))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: wrk missing and cannot apt-get it here; the benchmark will use its Python load generator"
    exit 0
fi
echo "bench: installing wrk from Debian"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq wrk >/dev/null
echo "bench: wrk installed ($(command -v wrk))"
