"""Start and stop the real SGLang server (PyPI sglang on a CPU torch, SmolLM2-135M) that
`bash scripts/sglang.sh` builds, serving the checkpoint `make engine` converts.

Also runnable by hand: `python tests/integration/sglang_server.py [PORT]` serves until Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-sglang" / "bin" / "python"
MODEL = ROOT / ".cache" / "models" / "smollm2-135m"
LOGS = ROOT / ".cache" / "logs"
MODEL_NAME = "smollm2"

# The settings tested on this 2-core CPU machine (see ENGINE.md in shared/).
ENV = {
    "HF_HUB_OFFLINE": "1",  # no hub here; the model is a local directory
    "SGLANG_USE_CPU_ENGINE": "1",  # SGLang's CPU code paths (else it looks for CUDA)
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:  # nobody left in the group
        return False


def _stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the whole group (the server forks scheduler and detokenizer processes), wait, SIGKILL."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (proc.poll() is None or _signal_group(proc.pid, 0)):
        time.sleep(0.2)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


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
    port = port or _free_port()
    base_url = f"http://127.0.0.1:{port}"
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"sglang-{port}.log"
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
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,  # own group, so _stop reaches all
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"SGLang exited with {proc.returncode} while starting; "
                    f"{log_path}:\n{_log_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=5):
                    break
            except OSError:  # refused, or HTTPError 503 while starting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SGLang not ready after {timeout:.0f} s; {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(1)
        yield base_url, proc
    finally:
        _stop(proc)


if __name__ == "__main__":
    # Stop the server on SIGTERM too (and on SIGINT even when started with it ignored, as `&` does).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with start_sglang_server(int(sys.argv[1]) if len(sys.argv) > 1 else None) as (url, p):
        print(f"SGLang ready at {url} (model {MODEL_NAME!r}); Ctrl-C stops it", flush=True)
        try:
            p.wait()
        except KeyboardInterrupt:
            pass
