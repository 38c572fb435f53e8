"""Launching a real engine server for the integration tests, and stopping all of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache" / "models" / "smollm2-135m"
LOGS = ROOT / ".cache" / "logs"
MODEL_NAME = "smollm2"


def free_port() -> int:
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
    """SIGTERM the whole group (servers fork engine processes), wait, then SIGKILL."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    # Let every member exit by itself (the engines clean up shared memory on SIGTERM).
    while time.monotonic() < deadline and (proc.poll() is None or _signal_group(proc.pid, 0)):
        time.sleep(0.2)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def launched(name: str, cmd: list[str], env: dict[str, str], ready_url: str, log_path: Path,
             timeout: float) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group until `ready_url` answers 200; stop it all on exit."""
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,  # own group, so _stop reaches all
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while starting; "
                    f"{log_path}:\n{_log_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(ready_url, timeout=5):
                    break
            except OSError:  # refused, or an HTTP error while it warms up
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} not ready after {timeout:.0f} s; {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(1)
        yield proc
    finally:
        _stop(proc)


def serve_by_hand(start, argv: list[str], name: str) -> None:
    """`python FILE [PORT]`: serve until Ctrl-C or SIGTERM (also when started with `&`)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with start(int(argv[1]) if len(argv) > 1 else None) as (url, proc):
        print(f"{name} ready at {url} (model {MODEL_NAME!r}); Ctrl-C stops it", flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
