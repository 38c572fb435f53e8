"""`/health/live` and `/health/ready` as Kubernetes probes expect; `/health` unchanged."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from proxy.control.health import Readiness
from proxy.pipeline.app import create_app
from proxy.settings import Settings
from proxy.store.db import check_writable, make_engine, open_store
from proxy.upstream.base import UpstreamError
from tests.fakes import JSON, FakeResponse, ScriptedUpstream


def client_of(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")


def models(call):
    return FakeResponse(200, list(JSON), [b'{"data":[]}'])


async def test_live_answers_before_start_and_ready_waits_for_it():
    app = create_app(Settings(upstream_url="http://scripted.upstream"), ScriptedUpstream(models),
                     lambda batch: None)
    async with client_of(app) as client:  # no lifespan: the app has not started
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    assert ready.status_code == 503
    assert ready.json()["status"] == "not ready"
    assert ready.json()["checks"]["migrations"]["ok"] is False


async def test_ready_on_a_migrated_writable_store_and_an_answering_upstream(tmp_path):
    upstream = ScriptedUpstream(models)
    app = create_app(Settings(upstream_url="http://scripted.upstream",
                              db_url=f"sqlite:///{tmp_path / 'd.db'}"), upstream)
    async with app, client_of(app) as client:
        ready = await client.get("/health/ready")
        health = await client.get("/health")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert {name: c["ok"] for name, c in checks.items()} == {
        "migrations": True, "store": True, "upstream": True}
    assert [(c.method, c.path) for c in upstream.calls] == [("GET", "/v1/models")]
    assert health.status_code == 200 and health.json()["status"] == "ok"  # /health stays


@pytest.mark.parametrize("answer, detail", [
    (UpstreamError("connect", "upstream http://x unreachable: refused"), "unreachable"),
    (FakeResponse(503, list(JSON), [b"{}"]), "answered 503"),
])
async def test_not_ready_while_the_upstream_does_not_answer(answer, detail):
    app = create_app(Settings(upstream_url="http://scripted.upstream"),
                     ScriptedUpstream(lambda call: answer), lambda batch: None)
    async with app, client_of(app) as client:
        ready = await client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["upstream"]["ok"] is False
    assert detail in ready.json()["checks"]["upstream"]["detail"]
    assert ready.json()["checks"]["store"]["ok"] is True


async def test_not_ready_while_store_writes_fail():
    broken = [True]

    def failing(batch):
        if broken[0]:
            raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    app = create_app(Settings(upstream_url="http://scripted.upstream"), ScriptedUpstream(models),
                     failing)
    async with app, client_of(app) as client:
        await client.post("/v1/chat/completions", content=json.dumps({"model": "m", "messages": []}))
        for _ in range(200):  # until the recorder's first write has failed
            if app.recorder is not None and not app.recorder.healthy:
                break
            await asyncio.sleep(0.05)
        ready = await client.get("/health/ready")
        broken[0] = False  # the store comes back: the kept record is written at shutdown
    assert ready.status_code == 503
    assert ready.json()["checks"]["store"] == {"ok": False, "detail": "the last write failed (see /health)"}


def test_a_read_only_store_is_not_writable(tmp_path):
    path = tmp_path / "ro.db"
    open_store(f"sqlite:///{path}")
    check_writable(make_engine(f"sqlite:///{path}"))  # writable: no error
    read_only = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")  # not make_engine: no mkdir
    with pytest.raises(OperationalError, match="readonly"):
        check_writable(read_only)


class Silent:
    """An upstream that never answers."""

    base_url = "http://silent"

    async def send(self, method, path, headers, body):
        await asyncio.sleep(3600)

    async def aclose(self) -> None:
        pass


async def test_ready_checks_give_up_within_their_timeout():
    readiness = Readiness(Silent(), timeout_s=0.2)

    def locked() -> None:
        raise OperationalError("UPDATE", {}, Exception("database is locked"))

    readiness.store_check = locked
    ready, checks = await asyncio.wait_for(readiness.check(True, True), 30)
    assert not ready
    assert checks["upstream"] == {"ok": False, "detail": "no answer within 0.2 s"}
    assert checks["store"]["ok"] is False and "database is locked" in checks["store"]["detail"]
