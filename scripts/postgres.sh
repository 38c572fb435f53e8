#!/usr/bin/env bash
# Installs the PostgreSQL server the store tests run on: Debian's `postgresql` (15).
# The tests start and stop their own server (tests/postgres.py); nothing runs here.
# Idempotent: does nothing when initdb and pg_ctl are already installed.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
if [[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]]; then
    echo "postgres: $PG_BIN present"
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "postgres: $PG_BIN missing and this user cannot apt-get it; install Debian's postgresql" >&2
    exit 1
fi
echo "postgres: installing Debian's postgresql"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
# The package starts a cluster of its own on 5432; the tests need none of it.
if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster 15 main stop 2>/dev/null || true
fi
echo "postgres: installed ($PG_BIN)"
