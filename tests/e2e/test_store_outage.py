"""A PostgreSQL server that goes away and comes back (the real server, stopped and restarted):
the proxy keeps serving, /health says degraded, the records are retried and written once the
server is back, none lost while the queue has room."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dynasorctl import traces
from dynasorctl.replay import serve_replay
from proxy.pipeline.app import create_app
from proxy.settings import Settings
from proxy.store.db import open_store
from proxy.store.models import RequestRow
from tests.postgres import PostgresServer


async def _until(check: Callable[[], Any], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_the_proxy_rides_out_a_postgres_restart():
    server = PostgresServer()  # its own: this test stops it
    await asyncio.to_thread(server.start)
    try:
        url = server.database()
        sample = traces.load_cot(traces.PACKAGED_SAMPLE)[:15]
        async with serve_replay(sample, tokens_per_second=0) as upstream:
            app = create_app(Settings(upstream_url=upstream, db_url=url, probe_rate=0))
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                       base_url="http://proxy", timeout=60)

            async def send(trace: traces.CotTrace) -> None:
                body = {"model": trace.model, "seed": trace.seed, "max_tokens": 64,
                        "messages": [{"role": "user", "content": trace.problem}]}
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 200

            async with app:
                for t in sample[:5]:
                    await send(t)
                await _until(lambda: app.metrics.records_written == 5, "the first records")

                await asyncio.to_thread(server.stop)  # the database goes away
                for t in sample[5:]:
                    await send(t)  # the proxy keeps serving
                await _until(lambda: app.metrics.write_errors >= 1
                             and app.health()["store"]["pending"] == 10, "failed writes")
                health = (await client.get("/health")).json()
                assert health["status"] == "degraded" and not health["store"]["ok"]
                assert health["store"]["pending"] == 10 and health["store"]["last_error"]
                assert app.metrics.records_written == 5

                await asyncio.to_thread(server.start)  # and comes back
                await _until(lambda: app.metrics.records_written == 15, "the retried records")
                health = (await client.get("/health")).json()
                assert health["status"] == "ok" and health["store"]["pending"] == 0
                assert health["store"]["dropped"] == 0
        with Session(open_store(url)) as s:
            assert s.scalar(select(func.count()).select_from(RequestRow)) == 15
    finally:
        await asyncio.to_thread(server.close)
