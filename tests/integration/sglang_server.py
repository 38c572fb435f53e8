"""Start and stop the real SGLang server (PyPI sglang on a CPU torch, SmolLM2-135M) that
`bash scripts/sglang.sh` builds, serving the checkpoint `make engine` converts.

Also runnable by hand: `python tests/integration/sglang_server.py [PORT]` serves until Ctrl-C.
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

PYTHON = ROOT / ".venv-sglang" / "bin" / "python"

# The settings tested on this 2-core CPU machine (see ENGINE.md in shared/).
ENV = {
    "HF_HUB_OFFLINE": "1",  # no hub here; the model is a local directory
    "SGLANG_USE_CPU_ENGINE": "1",  # SGLang's CPU code paths (else it looks for CUDA)
}


@contextmanager
def start_sglang_server(
    port: int | None = None, timeout: float = 240
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base_url, process) once the server is up; base_url has no /v1 suffix.

    Readiness is GET /health answering 200: SGLang answers /v1/models while it is still
    warming up, but /health only after its warm-up request (503 before).
    """
    if not (PYTHON.parent.parent / ".installed").exists() or not (MODEL / ".converted").exists():
        raise RuntimeError(
            f"The SGLang server is not built ({PYTHON.parent.parent}/.installed or "
            f"{MODEL}/.converted is missing): run `make engine` (it runs scripts/sglang.sh) first."
        )
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        str(PYTHON), "-m", "sglang.launch_server",
        "--model-path", str(MODEL), "--served-model-name", MODEL_NAME,
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
        "--attention-backend", "torch_native",  # no CUDA attention kernels here
        "--disable-overlap-schedule",
        "--max-total-tokens", "32768",  # KV cache size in tokens
        "--enable-cache-report",  # usage.prompt_tokens_details.cached_tokens
        "--enable-metrics",  # /metrics
    ]  # fmt: skip
    with launched("SGLang", cmd, ENV, f"{base_url}/health", LOGS / f"sglang-{port}.log",
                  timeout) as proc:
        yield base_url, proc


if __name__ == "__main__":
    serve_by_hand(start_sglang_server, sys.argv, "SGLang")
