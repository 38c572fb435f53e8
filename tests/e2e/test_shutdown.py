"""A real `dynasorctl observe` process, stopped every way it can be: nothing survives it, nothing
it was recording is lost, and a stalled upstream cannot hold it up past its grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from proxy.store.db import open_store
from proxy.store.models import RequestRow
from tests import procs
from tests.servers import free_port, serving


async def until(condition, timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"{what}: not after {timeout_s:g} s"
        await asyncio.sleep(0.1)


@asynccontextmanager
async def proxy_process(tmp_path: Path, upstream: str, **env: str) -> AsyncIterator[tuple[subprocess.Popen, str]]:
    """`dynasorctl observe` in its own process group, ready; the group is killed afterwards."""
    port = free_port()
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynasorctl", "observe", "--upstream", upstream, "--port", str(port),
             "--db", f"sqlite:///{tmp_path}/store.db"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **{f"DYNASOR_{k.upper()}": v for k, v in env.items()}})
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            async def ready() -> bool:
                assert proc.poll() is None, f"the proxy exited while starting:\n{log.read_text()}"
                try:
                    return (await client.get(f"{url}/health")).status_code == 200
                except httpx.HTTPError:
                    return False

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while not await ready():
                assert loop.time() < deadline, f"the proxy did not start:\n{log.read_text()}"
                await asyncio.sleep(0.2)
        yield proc, url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def records(tmp_path: Path) -> list[RequestRow]:
    with Session(open_store(f"sqlite:///{tmp_path}/store.db")) as s:
        return list(s.scalars(select(RequestRow)).all())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL (a crash)"])
async def test_no_child_process_survives_the_proxy(tmp_path, sig):
    async with proxy_process(tmp_path, f"http://127.0.0.1:{free_port()}") as (proc, _):
        # the answer-equivalence worker starts with the proxy
        await until(lambda: procs.children(proc.pid), 120, "the proxy's worker process")
        kids = procs.children(proc.pid)
        proc.send_signal(sig)
        await until(lambda: proc.poll() is not None, 60, "the proxy's exit")
        await until(lambda: not any(procs.alive(k) for k in kids), 30,
                    f"its children {[procs.command(k) for k in kids if procs.alive(k)]} to end")


async def _stalled(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An upstream that streams two chunks of a completion, then says nothing more."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for piece in ("Let", " me"):
        chunk = b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % piece.encode()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stalled_stream(url: str, started: asyncio.Event) -> bytes:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Think."}]}
    async with httpx.AsyncClient(timeout=120) as client, \
            client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        got = b""
        async for chunk in r.aiter_bytes():
            got += chunk
            started.set()
        return got


@pytest.mark.parametrize("second_signal", [False, True], ids=["grace runs out", "second signal"])
async def test_a_stalled_stream_is_ended_and_recorded_as_interrupted(tmp_path, second_signal):
    grace = "120" if second_signal else "1"  # a second signal must not wait out the grace period
    async with serving(_stalled) as upstream, \
            proxy_process(tmp_path, upstream.replace("http://", "http://ops:s3cret@") + "/v1",
                          shutdown_grace_s=grace, probe_rate="0") as (proc, url):
        started = asyncio.Event()
        client = asyncio.create_task(_stalled_stream(url, started))
        await asyncio.wait_for(started.wait(), 60)
        proc.send_signal(signal.SIGTERM)
        if second_signal:
            await asyncio.sleep(1.0)
            assert proc.poll() is None  # still in its grace period
            proc.send_signal(signal.SIGTERM)
        got = await asyncio.wait_for(client, 60)
        await until(lambda: proc.poll() is not None, 60, "the proxy's exit")
    assert got.startswith(b'data: {"choices"') and b"Let" in got
    assert b"interrupted: the proxy is shutting down" in got and got.endswith(b"data: [DONE]\n\n")
    (row,) = records(tmp_path)
    assert row.status_code == 200 and row.error == "interrupted: the proxy is shutting down"
    assert row.stream and row.latency_ms < 60_000
    log = (tmp_path / "proxy.log").read_text()
    assert "note: the /v1 at the end of the upstream URL is dropped" in log
    assert "s3cret" not in log + (row.upstream or "") and "ops:***@127.0.0.1" in log


_PARENT = """
import sys, time
from pathlib import Path
from dynasorctl import stack
port = stack.free_port()
with stack.running(["replay", "--port", str(port)], "replay", f"http://127.0.0.1:{port}",
                   Path(sys.argv[1])) as proc:
    print(proc.pid, flush=True)
    time.sleep(600)
"""


async def test_a_started_dynasorctl_ends_when_its_parent_is_killed(tmp_path):
    """`bench enforce` and friends start proxies and replays as processes (dynasorctl.stack);
    killed outright (SIGKILL, a test's timeout), the parent leaves none of them behind."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path / "replay.log")],  # noqa: ASYNC220
                              stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(parent.stdout.readline), 120)
        child = int(line)
        assert procs.alive(child) and procs.parent(child) == parent.pid
        parent.kill()
        await until(lambda: not procs.alive(child), 30, "the replay outlived its killed parent")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
