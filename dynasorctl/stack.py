"""Running `dynasorctl` services as real processes: the replay upstream and the proxy.

Used by `dynasorctl demo` and `dynasorctl bench enforce`, which drive both ends.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from dynasorctl.errors import UserError
from proxy.lifetime import child_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, name: str, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{name} exited at start-up (code {proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"{name} did not become ready in {timeout_s:.0f} s; see {log}")


@contextlib.contextmanager
def running(args: list[str], name: str, url: str, log: Path) -> Iterator[subprocess.Popen]:
    """A `dynasorctl` subcommand as a real process; stopped with SIGTERM (the proxy flushes)."""
    with log.open("w") as out:
        # It ends with this process even if this one is killed (no proxy left behind).
        proc = subprocess.Popen([sys.executable, "-m", "dynasorctl", *args], stdout=out, stderr=out,
                                env=child_env())
        try:
            _wait_ready(url, proc, name, log)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@contextlib.contextmanager
def proxies(n: int, upstream: str, db: str, logs: Path) -> Iterator[list[str]]:
    """`n` proxies sharing the store `db`, in front of `upstream`: their base URLs."""
    with contextlib.ExitStack() as stack:
        urls = []
        for i in range(n):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            stack.enter_context(running(["observe", "--upstream", upstream, "--port", str(port),
                                         "--db", db], f"proxy {i}", urls[-1],
                                        logs / f"proxy{i}.log"))
        yield urls


@contextlib.contextmanager
def replay_and_proxy(traces_file: Path, tokens_per_second: float, proxy_args: list[str],
                     logs: Path, trials: Sequence[Path] = ()) -> Iterator[tuple[str, str]]:
    """The replay upstream on `traces_file` (and `trials`) and the proxy in front of it:
    (replay, proxy) URLs."""
    logs.mkdir(parents=True, exist_ok=True)
    replay_port, proxy_port = free_port(), free_port()
    replay_url, proxy_url = f"http://127.0.0.1:{replay_port}", f"http://127.0.0.1:{proxy_port}"
    with_trials = [arg for path in trials for arg in ("--trials", str(path))]
    with running(["replay", "--traces", str(traces_file), "--port", str(replay_port),
                  "--tokens-per-second", str(tokens_per_second), *with_trials], "replay upstream",
                 replay_url, logs / "replay.log"):
        with running(["observe", "--upstream", replay_url, "--port", str(proxy_port), *proxy_args],
                     "proxy", proxy_url, logs / "proxy.log"):
            yield replay_url, proxy_url
