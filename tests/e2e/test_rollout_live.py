"""Rollout state in the store, live: two proxy processes, the kill switch, the admin API, guardrails."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from dynasorctl.stack import free_port, running
from proxy.control import rollout
from proxy.control.admin import AdminApp
from proxy.control.guardrails import GuardrailSettings
from proxy.pipeline.app import create_app
from proxy.settings import Settings
from proxy.store.db import open_store
from proxy.store.models import PolicyRow
from tests.fakes import SSE, Call, FakeResponse, ScriptedUpstream, chat_stream, probe_reply

POLICY = 'version = 1\nkind = "cot"\nmodel = "*"\n\n[cot]\ninterval = 64\nwindow = 2\n'


def _store_with_policy(path: Path) -> tuple[str, int]:
    url = f"sqlite:///{path}"
    engine = open_store(url)
    with engine.begin() as conn:
        conn.execute(insert(PolicyRow), [{"kind": "cot", "model": "*", "version": 1, "policy_toml": POLICY,
                                          "source": "test", "created_at": datetime.now(UTC)}])
    return url, 1


def _mode(health: dict) -> str:
    return health["rollout"]["scopes"]["*"]["mode"] if health["rollout"]["source"] == "store" else "flags"


def test_kill_switch_reaches_two_proxies_within_a_second(tmp_path):
    db, policy_id = _store_with_policy(tmp_path / "shared.db")
    rollout.set_scope(open_store(db), "*", mode="enforce", percent=10, policy=policy_id,
                      reason="start", who="test")
    upstream = f"http://127.0.0.1:{free_port()}"  # never called: only /health is asked
    ports = [free_port(), free_port()]
    with running(["observe", "--upstream", upstream, "--port", str(ports[0]), "--db", db], "proxy 1",
                 f"http://127.0.0.1:{ports[0]}", tmp_path / "p1.log"), \
         running(["observe", "--upstream", upstream, "--port", str(ports[1]), "--db", db], "proxy 2",
                 f"http://127.0.0.1:{ports[1]}", tmp_path / "p2.log"):
        urls = [f"http://127.0.0.1:{p}/health" for p in ports]
        assert [_mode(httpx.get(u).json()) for u in urls] == ["enforce", "enforce"]
        killed = subprocess.run([sys.executable, "-m", "dynasorctl", "rollout", "kill", "--reason",
                                 "drill", "--db", db], capture_output=True, text=True, timeout=60)
        assert killed.returncode == 0, killed.stderr
        started = time.monotonic()
        pending = set(urls)
        while pending and time.monotonic() - started < 5:
            pending = {u for u in pending if _mode(httpx.get(u).json()) != "observe"}
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    assert not pending
    assert elapsed <= 1.0, f"the kill took {elapsed:.2f} s to reach both proxies"
    entries = rollout.history(open_store(db))
    assert any(e.reason == "drill" and e.field == "mode" and e.new == "observe" for e in entries)


async def test_admin_api_needs_its_token_and_audits_changes(tmp_path):
    db, policy_id = _store_with_policy(tmp_path / "s.db")
    app = create_app(Settings(db_url=db, admin_token="s3cret"),
                     upstream=ScriptedUpstream(lambda call: FakeResponse()))
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=AdminApp(app, "s3cret")),
                              base_url="http://admin")
    auth = {"authorization": "Bearer s3cret"}
    async with app:
        assert (await admin.get("/rollout")).status_code == 401
        assert (await admin.get("/rollout", headers={"authorization": "Bearer nope"})).status_code == 401
        r = await admin.post("/rollout/set", headers=auth,
                             json={"mode": "enforce", "percent": 5, "policy": str(policy_id), "reason": "try"})
        assert r.status_code == 200, r.text
        assert app.control.plan(None, None, "k", None).scope == "*"  # this proxy applied it at once
        bad = await admin.post("/rollout/set", headers=auth, json={"mode": "enforce", "percent": 150,
                                                                   "reason": "x"})
        assert bad.status_code == 400 and "error" in bad.json()
        assert (await admin.post("/rollout/promote", headers=auth, json={"reason": "ok"})).status_code == 200
        state = (await admin.get("/rollout", headers=auth)).json()
        assert state["scopes"]["*"]["percent"] == 10
        assert (await admin.post("/rollout/kill", headers=auth, json={"reason": "stop"})).status_code == 200
    entries = rollout.history(open_store(db))
    assert {e.who for e in entries} == {"admin-api"}
    assert rollout.load_state(open_store(db)).scopes["*"].mode == "observe"


async def test_guardrail_breach_rolls_the_scope_back_to_shadow(tmp_path):
    db, policy_id = _store_with_policy(tmp_path / "s.db")
    rollout.set_scope(open_store(db), "*", mode="enforce", percent=50, policy=policy_id,
                      reason="start", who="test")
    answers = iter(["5", "5"] * 100)

    def handler(call: Call):
        if call.json().get("continue_final_message"):
            return probe_reply(next(answers) + "}")
        # the model finishes on another answer than the probes agreed on
        return FakeResponse(200, list(SSE), chat_stream(["x "] * 150 + ["\\boxed{6}"]), delay_s=0.001)

    settings = Settings(db_url=db, guardrails=GuardrailSettings(min_sample=3, max_answer_change=0.2))
    app = create_app(settings, upstream=ScriptedUpstream(handler))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True}
    async with app:
        for i in range(12):
            await client.post("/v1/chat/completions", json=body, headers={"x-dynasor-program": f"p{i}"})
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        health = (await client.get("/health")).json()
    state = rollout.load_state(open_store(db)).scopes["*"]
    assert state.mode == "shadow" and state.updated_by == "guardrail"
    assert "answers changed" in state.reason
    assert app.metrics.rollbacks == 1
    assert health["rollout"]["scopes"]["*"]["mode"] == "shadow"


@pytest.fixture(autouse=True)
def _no_flag_mode(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DYNASOR_"):
            monkeypatch.delenv(name)
