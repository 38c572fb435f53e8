"""Start and stop the real vLLM server (CPU build, SmolLM2-135M) that `make engine` builds.

Also runnable by hand: `python tests/integration/engine.py [PORT]` serves until Ctrl-C.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

try:  # a package module if tests/integration ever gets an __init__.py
    from .launch import LOGS, MODEL, MODEL_NAME, ROOT, free_port, launched, serve_by_hand
except ImportError:
    from launch import LOGS, MODEL, MODEL_NAME, ROOT, free_port, launched, serve_by_hand

PYTHON = ROOT / ".venv-engine" / "bin" / "python"

# The settings tested on this 2-core CPU machine (see ENGINE.md in shared/).
ENV = {
    "HF_HUB_OFFLINE": "1",  # no hub here; the model is a local directory
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


@contextmanager
def start_vllm_server(
    port: int | None = None, timeout: float = 240
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base_url, process) once GET /v1/models answers; base_url has no /v1 suffix."""
    if not PYTHON.exists() or not (MODEL / ".converted").exists():
        raise RuntimeError(
            f"The vLLM engine is not built ({PYTHON} or {MODEL}/.converted is missing): "
            "run `make engine` first."
        )
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        str(PYTHON), "-m", "vllm.entrypoints.openai.api_server",  # the `vllm` script crashes
        "--model", str(MODEL), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--enable-prefix-caching",
        "--dtype", "bfloat16", "--enforce-eager",  # compiling takes 100 s and is not cached
    ]  # fmt: skip
    with launched("vLLM", cmd, ENV, f"{base_url}/v1/models", LOGS / f"vllm-{port}.log",
                  timeout) as proc:
        yield base_url, proc


if __name__ == "__main__":
    serve_by_hand(start_vllm_server, sys.argv, "vLLM")
