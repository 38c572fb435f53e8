"""Real routers from PyPI in front of two replay replicas, the proxy in front of the router.

With the router's session header set (`affinity_header`), every probe reaches the replica
that served its main request, and the requests still spread over both replicas; without
it, vLLM's router (consistent hashing with no key) sends everything to one replica and
SGLang's (manual routing with no key) scatters the probes. A replica that dies mid-stream
reaches the client as the documented SSE error frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dynasorctl import traces
from proxy.pipeline.app import create_app
from proxy.settings import Settings
from tests.routers import SGLANG_ROUTER, VLLM_ROUTER, Router, running_router
from tests.servers import free_port, serving

REQUESTS = 16  # distinct problems; all on one replica by chance: 2 in 2^16 with the header


@dataclass(frozen=True)
class Served:
    replica: int
    problem: str
    probe: bool


@contextlib.asynccontextmanager
async def _replicas(tmp_path: Path, n: int = 2) -> AsyncIterator[list[str]]:
    """`n` replay replicas as their own processes (tests/replica.py); their URLs."""
    ports = [free_port() for _ in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.replica", str(port),  # noqa: ASYNC220
                               str(tmp_path / f"replica{i}.jsonl")])
             for i, port in enumerate(ports)]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, proc in zip(urls, procs):
            await _ready(url, proc)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def _served(tmp_path: Path, n: int = 2) -> list[Served]:
    return [Served(i, **json.loads(line)) for i in range(n)
            for line in (tmp_path / f"replica{i}.jsonl").read_text().splitlines()]


async def _through_router(router: Router, affinity: bool, tmp_path: Path) -> list[Served]:
    sample = traces.load_cot(traces.PACKAGED_SAMPLE)[:REQUESTS]
    async with _replicas(tmp_path) as workers, \
            running_router(router, workers, tmp_path / f"{router.name}.log") as routed:
        # A request the router never answers fails in a minute, not in the default ten.
        settings = Settings(upstream_url=routed, db_url=f"sqlite:///{tmp_path}/s.db",
                            probe_max_tokens=32, read_timeout_s=60,
                            affinity_header=router.header if affinity else None)
        async with serving(create_app(settings)) as proxy, \
                httpx.AsyncClient(base_url=proxy, timeout=120) as client:
            async def one(trace: traces.CotTrace) -> None:
                body = {"model": trace.model, "seed": trace.seed, "stream": True,
                        "max_tokens": 1024,
                        "messages": [{"role": "user", "content": trace.problem}]}
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")

            await asyncio.gather(*(one(t) for t in sample))
    return _served(tmp_path)


def _probe_statuses(tmp_path: Path) -> str:
    """What the proxy recorded of its probes (for a failure's message)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        return repr(db.execute("SELECT status, count(*) FROM probes GROUP BY status").fetchall())


def _by_request(log: list[Served]) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Each problem's main request's replica, and (main's replica, probe's replica) per probe."""
    main = {s.problem: s.replica for s in log if not s.probe}
    assert len(main) == REQUESTS
    return main, [(main[s.problem], s.replica) for s in log if s.probe]


@pytest.mark.parametrize("router", [VLLM_ROUTER, SGLANG_ROUTER], ids=lambda r: r.name)
async def test_with_the_session_header_every_probe_reaches_its_requests_replica(router, tmp_path):
    main, probes = _by_request(await _through_router(router, True, tmp_path))
    assert len(probes) >= 2 * REQUESTS, _probe_statuses(tmp_path)
    assert all(m == p for m, p in probes)
    assert set(main.values()) == {0, 1}  # and the requests are spread over both replicas


@pytest.mark.parametrize("router", [VLLM_ROUTER, SGLANG_ROUTER], ids=lambda r: r.name)
async def test_without_it_the_router_cannot_keep_them_together(router, tmp_path):
    main, probes = _by_request(await _through_router(router, False, tmp_path))
    assert len(probes) >= 2 * REQUESTS, _probe_statuses(tmp_path)
    if router is VLLM_ROUTER:
        # No key to hash: every request, main or probe, lands on one replica; nothing spreads.
        assert len(set(main.values()) | {p for _, p in probes}) == 1
    else:
        # No key: each request goes to a replica at random; about half the probes leave
        # their request's replica and its prefix cache.
        moved = sum(m != p for m, p in probes) / len(probes)
        assert 0.2 < moved < 0.8


async def _ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait until the replica answers (a router checks its workers once at start)."""
    async with httpx.AsyncClient(timeout=2) as client:
        for _ in range(int(timeout_s / 0.1)):
            assert proc.poll() is None, "the replica exited at start-up"
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"replica {url} not ready in {timeout_s} s")


@pytest.mark.parametrize("router", [VLLM_ROUTER, SGLANG_ROUTER], ids=lambda r: r.name)
async def test_a_replica_lost_mid_stream_ends_the_clients_stream_with_the_error_frame(
        router, tmp_path):
    trace = traces.load_cot(traces.PACKAGED_SAMPLE)[0]
    port = free_port()
    replica = subprocess.Popen([sys.executable, "-m", "dynasorctl", "replay",  # noqa: ASYNC220
                                "--port", str(port), "--tokens-per-second", "50"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _ready(f"http://127.0.0.1:{port}", replica)
        async with running_router(router, [f"http://127.0.0.1:{port}"],
                                  tmp_path / "router.log") as routed:
            settings = Settings(upstream_url=routed, db_url=f"sqlite:///{tmp_path}/s.db",
                                affinity_header=router.header)
            async with serving(create_app(settings)) as proxy, \
                    httpx.AsyncClient(base_url=proxy, timeout=120) as client:
                body = {"model": trace.model, "stream": True,
                        "messages": [{"role": "user", "content": trace.problem}]}
                received = b""
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_raw():
                        received += chunk
                        if received.count(b"data: ") == 5 and replica.poll() is None:
                            replica.send_signal(signal.SIGKILL)  # the replica dies mid-stream
    finally:
        if replica.poll() is None:
            replica.kill()
        replica.wait()
    events = received.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    error = json.loads(events[-3].removeprefix(b"data: "))["error"]
    assert error["type"] == "upstream_error" and error["code"] == 502
    assert "broke off" in error["message"]
    assert b"[DONE]" not in b"\n\n".join(events[:-2])  # the replica never finished
