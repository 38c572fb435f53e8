"""The routers operators put in front of several replicas, as real processes: the PyPI builds
of vLLM's router and SGLang's (scripts/routers.sh installs them in .venv-router).

What each build accepts was read from its --help and checked against two replicas (see the
README's recipes): vllm-router 0.1.17 pins by `X-Session-ID` under `--policy
consistent_hash`; sglang-router 0.3.2 pins by `X-SMG-Routing-Key` under `--policy manual`.
Neither lets the header's name be chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.servers import free_port

VENV = Path(__file__).resolve().parent.parent / ".venv-router"


@dataclass(frozen=True)
class Router:
    name: str  # the PyPI project
    command: tuple[str, ...]  # the command before --worker-urls
    header: str  # the session header it pins by
    policy: str


VLLM_ROUTER = Router("vllm-router", ("vllm-router",), "X-Session-ID", "consistent_hash")
SGLANG_ROUTER = Router("sglang-router", ("sglang-router", "launch"), "X-SMG-Routing-Key", "manual")


@contextlib.asynccontextmanager
async def running_router(router: Router, workers: list[str], log: Path,
                         timeout_s: float = 120) -> AsyncIterator[str]:
    """The router in front of `workers` until the block ends; yields its base URL.

    Waits without blocking the event loop: the replicas may be served in this loop.
    """
    binary = VENV / "bin" / router.command[0]
    if not binary.exists():
        raise RuntimeError(f"no {router.name} at {binary}: run `bash scripts/routers.sh` "
                           "(make test does)")
    port = free_port()
    # Its own metrics port: the default (29000) would collide between test sessions.
    cmd = [str(binary), *router.command[1:], "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *workers, "--policy", router.policy,
           "--prometheus-port", str(free_port()), "--log-level", "error"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out,  # noqa: ASYNC220 - returns at once
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            async with httpx.AsyncClient(timeout=2) as client:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{router.name} exited ({proc.returncode}): "
                                           f"{log.read_text()[-2000:]}")
                    try:
                        if (await client.get(url + "/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{router.name} not ready in {timeout_s:.0f} s")
                    await asyncio.sleep(0.2)
            yield url
        finally:
            # sglang-router's launcher starts the router as a child: stop the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):  # nothing of the group outlives us
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
