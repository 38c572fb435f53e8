"""The dashboard open on a store that the real proxy is writing while the test runs."""

from __future__ import annotations

import asyncio

import httpx

from dynasorctl.dashboard.app import create_app as create_dashboard
from dynasorctl.dashboard.source import StoreSource
from proxy.pipeline.app import create_app as create_proxy
from proxy.settings import Settings
from proxy.store.db import make_engine
from tests.fakes import SSE, Call, FakeResponse, ScriptedUpstream, chat_stream, probe_reply
from tests.servers import serving


def _upstream() -> ScriptedUpstream:
    """140 streamed tokens answering 42; every probe (at 64 and 128 tokens) answers 42 too."""

    def handler(call: Call) -> FakeResponse:
        if call.json().get("continue_final_message"):
            return probe_reply("42}")
        return FakeResponse(200, list(SSE), chat_stream([f"t{i} " for i in range(139)] + ["\\boxed{42}"],
                                                        model="live-model"))

    return ScriptedUpstream(handler)


async def _until(pilot, condition, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "the dashboard did not show it in time"
        await pilot.pause(0.05)


async def test_dashboard_shows_requests_the_proxy_records_while_it_is_open(tmp_path):
    db_url = f"sqlite:///{tmp_path}/live.db"
    proxy = create_proxy(Settings(upstream_url=ScriptedUpstream.base_url, db_url=db_url),
                         _upstream())
    async with serving(proxy) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        # The same factory as `dynasorctl dashboard`, on the store the proxy has just opened.
        app = create_dashboard(StoreSource(make_engine(db_url)), refresh_s=0.2)
        async with app.run_test(size=(150, 40)) as pilot:
            table = app.query_one("#requests")
            await _until(pilot, lambda: app.snapshot.requests is not None)
            assert table.row_count == 0 and not app.query_one("#banner").has_class("shown")

            async def send(n: int) -> None:
                body = {"model": "live-model", "stream": True,
                        "messages": [{"role": "user", "content": "What is 6 * 7?"}]}
                for _ in range(n):
                    r = await client.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")

            await send(3)
            await _until(pilot, lambda: table.row_count == 3)
            rows = app.snapshot.requests
            assert {(r.model, r.mode, r.outcome, r.completion_tokens, r.final_answer)
                    for r in rows} == {("live-model", "observe", "ok", 140, "42")}
            assert all(r.probe_count == 2 for r in rows)  # probed at 64 and 128 tokens
            await _until(pilot, lambda: app.timeline is not None and len(app.timeline.probes) == 2)
            assert [p.answer for p in app.timeline.probes] == ["42", "42"]

            await send(2)  # more traffic while the dashboard stays open
            await _until(pilot, lambda: table.row_count == 5)
            await _until(pilot, lambda: app.snapshot.traffic is not None
                         and app.snapshot.traffic.requests == 5)
            assert "probes)" in str(app.query_one("#histogram").render())
            assert not app.query_one("#banner").has_class("shown")
