#!/usr/bin/env bash
# Builds a real SGLang server for the integration tests: the PyPI sglang wheel in its own
# venv, without its CUDA requirements, on the CPU torch wheel this machine has for cp311.
# It serves the SmolLM2 checkpoint scripts/engine.sh converts (tests/integration/sglang_server.py).
# Idempotent: the stamp holds what was installed, so a second run only checks it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3.11}            # torch 2.13.0+cpu is a local wheel for cp311 only
VENV=.venv-sglang
SGLANG=sglang==0.5.23
TORCH=torch==2.13.0+cpu
TORCHVISION=torchvision==0.28.0 # the release built against torch 2.13 (a CUDA build: patched below)
# Requirements of the wheel left out: CUDA/GPU kernels and libraries, which cannot run here,
# the torch it pins (2.14.1, CUDA), and audio/vision extras a text-only model never loads.
SKIP='^(sglang-kernel|flashinfer-python|flash-attn-4|cuda-python|nvidia-.*|nvshmem4py-.*|humming-kernels|quack-kernels|sgl-deep-ep|sgl-deep-gemm|sgl-flash-mla|tilelang|apache-tvm-ffi|torch-memory-saver|torch|torchvision|torchaudio|torchcodec|timm)$'
STUBS=scripts/sglang_stubs      # our import-only stand-in for sgl_kernel (no CPU build on PyPI)

# This machine's pip config lists local index folders that lack most projects;
# pip warns once per package about each, which would bury the progress lines.
pip() {
    "$VENV/bin/pip" "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

key="$SGLANG $TORCH $TORCHVISION stubs:$(cat "$STUBS"/pyproject.toml "$STUBS"/sgl_kernel/*.py | sha1sum | cut -c1-12)"
if [[ "$(cat "$VENV/.installed" 2>/dev/null)" == "$key" ]]; then
    echo "sglang: $VENV up to date"
    exit 0
fi
echo "sglang: creating $VENV with $SGLANG on $TORCH (4 to 5 minutes)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
mkdir -p .cache/wheels
pip download -q --no-deps -d .cache/wheels "$SGLANG"
wheel=$(ls .cache/wheels/sglang-0.5.23-*.whl)

# The wheel's own Requires-Dist (markers kept, extras dropped) minus $SKIP.
"$VENV/bin/python" - "$wheel" "$SKIP" > "$VENV/requirements.txt" <<'PYEOF'
import re, sys, zipfile
from email.parser import Parser
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

wheel, skip = sys.argv[1], re.compile(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    headers = Parser().parsestr(z.read(meta).decode())
for line in headers.get_all("Requires-Dist"):
    req = Requirement(line)
    if "extra" in str(req.marker or "") or skip.match(canonicalize_name(req.name)):
        continue
    print(line)
PYEOF
echo "$TORCH" > "$VENV/constraints.txt"
pip install -q -c "$VENV/constraints.txt" "$TORCH" "$TORCHVISION" -r "$VENV/requirements.txt"
pip install -q --no-deps "$wheel"   # its CUDA pins stay unmet on purpose

# Work-around 1: sglang imports torchvision at start-up, and PyPI's torchvision is a CUDA
# build whose extension does not load on a CPU torch; it then still registers fake kernels
# for torchvision::nms/qnms and its import fails ("operator torchvision::nms does not
# exist"). Register them only when the extension loaded, as its other registrations do.
meta_reg="$VENV/lib/python3.11/site-packages/torchvision/_meta_registrations.py"
sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::[a-z_]+")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))  # dynasor: CPU torch/' "$meta_reg"
if [[ "$(grep -c '# dynasor: CPU torch' "$meta_reg")" != 2 ]]; then
    echo "sglang: torchvision's _meta_registrations.py changed; update the patch in $0" >&2
    exit 1
fi

# Work-around 2: sglang imports names from sgl_kernel at start-up on a CPU; no CPU build is
# on PyPI. Install our stand-in (built from a copy, so the repository stays clean).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$STUBS"/pyproject.toml "$STUBS"/sgl_kernel "$tmp"/
pip install -q --no-deps --no-build-isolation "$tmp"

SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -W ignore -c "import torchvision, sglang.srt.entrypoints.http_server" \
    || { echo "sglang: $VENV does not import; see above" >&2; exit 1; }
echo "$key" > "$VENV/.installed"
echo "sglang: ready"
