"""The router's session header (`affinity_header`): on the main request, every probe and every
sample, valued by the program or the request; the client's own value wins; unset, none.
The real routers are in tests/e2e/test_routers.py."""

from __future__ import annotations

import json

from proxy.pipeline.exchange import affinity_of, pinned, probe_headers
from tests.fakes import JSON, SSE, Call, FakeResponse, chat_stream, probe_reply
from tests.unit.test_proxy import _boxed_choice, chat_body, make

HEADER = b"x-session-id"


def _streaming():
    main = FakeResponse(200, list(SSE), chat_stream([f"t{i} " for i in range(140)]), delay_s=0.001)

    def handler(call: Call):
        return probe_reply("42}") if call.json().get("continue_final_message") else main

    return handler


async def test_main_request_and_every_probe_carry_the_request_id():
    app, upstream, sink, client = make(_streaming(), affinity_header="X-Session-ID")
    async with app:
        await client.post("/v1/chat/completions", json=chat_body(stream=True))
    (rec,) = sink.records
    assert len(upstream.calls) == 3  # the main request and probes at 64 and 128 tokens
    assert {c.header(HEADER) for c in upstream.calls} == {rec.request["id"].encode()}


async def test_the_clients_own_value_is_kept_and_reaches_the_probes():
    app, upstream, _sink, client = make(_streaming(), affinity_header="X-Session-ID")
    async with app:
        await client.post("/v1/chat/completions", json=chat_body(stream=True),
                          headers={"X-Session-ID": "conversation-9"})
    assert [c.header(HEADER) for c in upstream.calls] == [b"conversation-9"] * 3
    assert all(sum(k == HEADER for k, _ in c.headers) == 1 for c in upstream.calls)


async def test_a_tagged_program_is_pinned_as_one():
    def handler(call: Call):
        body = json.dumps({"choices": [_boxed_choice(0, "7")]}).encode()
        return FakeResponse(200, list(JSON), [body])

    app, upstream, _sink, client = make(handler, affinity_header="X-SMG-Routing-Key")
    async with app:
        for _ in range(2):
            await client.post("/v1/chat/completions", json=chat_body(),
                              headers={"x-dynasor-program": "p1"})
    assert [c.header(b"x-smg-routing-key") for c in upstream.calls] == [b"p1", b"p1"]


async def test_unset_sends_no_session_header():
    app, upstream, _sink, client = make(_streaming())
    async with app:
        await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert len(upstream.calls) == 3
    assert all(c.header(HEADER) is None for c in upstream.calls)


def test_the_pure_pieces():
    headers = [(b"authorization", b"Bearer k"), (b"x-other", b"no")]
    pin = affinity_of(headers, "X-Session-ID", "r1")
    assert pin == (HEADER, b"r1")
    assert affinity_of(headers, None, "r1") is None
    assert pinned(headers, pin) == [*headers, pin]
    assert pinned([(HEADER, b"mine")], affinity_of([(HEADER, b"mine")], "x-session-id", "r1")) == [
        (HEADER, b"mine")]
    assert probe_headers(headers, "p1", pin) == [(b"content-type", b"application/json"),
                                                 (b"authorization", b"Bearer k"), pin,
                                                 (b"x-dynasor-program", b"p1"), (b"x-dynasor-job", b"probe")]
