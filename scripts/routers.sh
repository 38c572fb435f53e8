#!/usr/bin/env bash
# Builds the routers the affinity tests put in front of two replicas: the PyPI builds
# of vLLM's router (`vllm-router`) and SGLang's (`sglang-router`), Rust binaries in
# wheels, in a venv of their own so their pins never meet dynasor's.
# Idempotent: the stamp holds what was installed, so bumping a pin rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3.11}
VENV=.venv-router
PINS="vllm-router==0.1.17 sglang-router==0.3.2"

if [[ "$(cat "$VENV/.installed" 2>/dev/null)" == "$PINS" ]]; then
    echo "routers: $VENV up to date"
    exit 0
fi
echo "routers: creating $VENV with $PINS"
"$PY" -m venv "$VENV"
# This machine's pip config lists local index folders that lack most projects.
"$VENV/bin/pip" install -q $PINS 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
echo "$PINS" > "$VENV/.installed"
