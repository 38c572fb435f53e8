"""Start and stop the real vLLM server (CPU build, SmolLM2-135M) that `make engine` builds.

Also runnable by hand: `python tests/integration/engine.py [PORT]` serves until Ctrl-C.
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
PYTHON = ROOT / ".venv-engine" / "bin" / "python"
MODEL = ROOT / ".cache" / "models" / "smollm2-135m"
LOGS = ROOT / ".cache" / "logs"
MODEL_NAME = "smollm2"

# The settings tested on this 2-core CPU machine (see ENGINE.md in shared/).
ENV = {
    "HF_HUB_OFFLINE": "1",  # no hub here; the model is a local directory
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
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
    """SIGTERM the whole group (the API server forks an engine-core process), wait, SIGKILL."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    # Let every member exit by itself (vLLM cleans up shared memory on SIGTERM).
    while time.monotonic() < deadline and (proc.poll() is None or _signal_group(proc.pid, 0)):
        time.sleep(0.2)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


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
    port = port or _free_port()
    base_url = f"http://127.0.0.1:{port}"
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"vllm-{port}.log"
    cmd = [
        str(PYTHON), "-m", "vllm.entrypoints.openai.api_server",  # the `vllm` script crashes
        "--model", str(MODEL), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--enable-prefix-caching",
        "--dtype", "bfloat16", "--enforce-eager",  # compiling takes 100 s and is not cached
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
                    f"vLLM exited with {proc.returncode} while starting; "
                    f"{log_path}:\n{_log_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM not ready after {timeout:.0f} s; {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(1)
        yield base_url, proc
    finally:
        _stop(proc)


if __name__ == "__main__":
    # Stop the server on SIGTERM too (and on SIGINT even when started with it ignored, as `&` does).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with start_vllm_server(int(sys.argv[1]) if len(sys.argv) > 1 else None) as (url, p):
        print(f"vLLM ready at {url} (model {MODEL_NAME!r}); Ctrl-C stops it", flush=True)
        try:
            p.wait()
        except KeyboardInterrupt:
            pass
