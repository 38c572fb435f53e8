"""What the real-engine tests check the same way against vLLM and SGLang."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from proxy.app import ProxyApp
from proxy.store.models import ProbeRow, RequestRow


async def both(upstream: str, proxy: str, path: str, body: dict) -> tuple[httpx.Response, httpx.Response]:
    """The same request sent directly and through the proxy: (direct, via)."""
    async with httpx.AsyncClient(timeout=120) as client:
        direct = await client.post(upstream + path, json=body)
        via = await client.post(proxy + path, json=body)
    return direct, via


async def assert_probed(app: ProxyApp, engine: Engine, tokens: int, interval: int, max_tokens: int) -> None:
    """The one streamed request was recorded with its probes, answered and counted."""
    await asyncio.sleep(1.0)  # the record is written off the request path
    with Session(engine) as s:
        req = s.scalars(select(RequestRow).where(RequestRow.stream.is_(True))).one()
        probes = s.scalars(select(ProbeRow).where(ProbeRow.request_id == req.id)).all()
    assert req.status_code == 200 and req.completion_tokens == tokens and req.probed
    ok = [p for p in probes if p.status == "ok"]
    assert ok, f"no probe answered: {[(p.position, p.status) for p in probes]}"
    assert all(p.position % interval == 0 for p in probes)
    assert all(0 < p.output_tokens <= max_tokens for p in ok)
    assert app.metrics.probe_tokens >= sum(p.output_tokens for p in ok)
