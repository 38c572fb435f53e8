"""Faults on either side of the proxy: what the client sees, what is recorded, nothing lost."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from proxy.pipeline.app import create_app
from proxy.settings import Settings
from tests.fakes import JSON, SSE, Call, FakeResponse, ScriptedUpstream, chat_stream
from tests.servers import serving
from tests.unit.test_proxy import Sink, chat_body, make

WHOLE = json.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"},
                                            "finish_reason": "stop"}]}).encode()


async def test_a_non_streamed_body_cut_mid_way_reaches_the_client_cut_and_is_recorded(caplog):
    headers = [*JSON, (b"content-length", str(len(WHOLE)).encode())]
    app, upstream, sink, _ = make(lambda call: FakeResponse(200, headers, [WHOLE[:20], WHOLE[20:]], fail_after=1))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        with pytest.raises(httpx.RemoteProtocolError):  # not a shorter body passed off as whole
            await client.post("/v1/chat/completions", json=chat_body())
    (rec,) = sink.records
    assert rec.request["status_code"] == 200 and "broke off" in rec.request["error"]
    assert app.metrics.upstream_errors["broken"] == 1
    assert not [r for r in caplog.records if r.exc_info]  # no traceback in the log


async def test_a_silent_upstream_mid_stream_is_a_504_event():
    main = FakeResponse(200, list(SSE), chat_stream(["a", "b", "c"]), fail_after=2, fail_kind="timeout")
    app, upstream, sink, client = make(lambda call: main, probe_rate=0)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    event = json.loads(r.content.split(b"\n\n")[-3].removeprefix(b"data: "))
    assert event["error"]["code"] == 504 and event["error"]["type"] == "upstream_timeout"
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert sink.records[0].request["error"] == "upstream went silent mid-response"


@pytest.mark.parametrize("probe_rate", [0.0, 1.0], ids=["read at the end", "read as it comes"])
async def test_a_stream_request_answered_with_a_json_error_records_the_error(probe_rate):
    error = b'{"object":"error","message":"max_tokens must be at least 1","code":400}'
    app, upstream, sink, client = make(lambda call: FakeResponse(400, list(JSON), [error]), probe_rate=probe_rate)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=-1))
    assert (r.status_code, r.content) == (400, error)
    assert sink.records[0].request["error"] == "max_tokens must be at least 1"


async def test_json_nested_deeper_than_python_reads_is_forwarded_not_a_500():
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    reply = b'{"error":{"message":"invalid JSON","type":"BadRequestError","code":400}}'
    app, upstream, sink, client = make(lambda call: FakeResponse(400, list(JSON), [reply]))
    async with app:
        r = await client.post("/v1/chat/completions", content=deep)
    assert (r.status_code, r.content) == (400, reply)  # the upstream's answer, as for any bad JSON
    assert upstream.calls[0].body == deep


async def test_a_body_shorter_than_its_content_length_gets_a_400_after_the_timeout():
    app, upstream, sink, _ = make(lambda call: FakeResponse(200, list(JSON), [WHOLE]),
                                  request_body_timeout_s=0.5)
    async with serving(app) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n" + b'{"model": "m"')
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        body = await asyncio.wait_for(reader.read(), 30)  # and the connection is closed
        writer.close()
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
    error = json.loads(body.split(b"\r\n")[1])["error"]  # the one chunk
    assert error["type"] == "invalid_request_error" and "13 bytes received" in error["message"]
    assert upstream.calls == [] and sink.records == []
    assert app.metrics.requests[("/v1/chat/completions", 400)] == 1


async def test_an_exception_inside_the_proxy_is_an_openai_500_and_still_recorded(caplog, monkeypatch):
    app, upstream, sink, client = make(lambda call: FakeResponse(200, list(JSON), [WHOLE]))

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.control, "plan", broken)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
        ok = await client.get("/health")
    assert r.status_code == 500 and r.json()["error"]["type"] == "proxy_error"
    assert sink.records[0].request["error"] == "proxy error: RuntimeError: a bug"
    assert ok.json()["status"] == "ok"
    assert [r.levelno for r in caplog.records if r.exc_info] == [logging.ERROR]  # logged once


class _Connecting(ScriptedUpstream):
    """An upstream that never answers the request (still connecting)."""

    async def send(self, method, path, headers, body):
        self.calls.append(Call(method, path, headers, body))
        await asyncio.Event().wait()


@pytest.mark.parametrize("answered", [False, True], ids=["nothing sent yet", "a body under way"])
async def test_a_request_the_server_cancels_is_ended_and_recorded_as_interrupted(answered):
    """What the grace period's end (or a second signal) does to a request still running."""
    upstream = (ScriptedUpstream(lambda call: FakeResponse(200, list(JSON), [WHOLE], delay_s=600))
                if answered else _Connecting(lambda call: None))
    sink = Sink()
    app = create_app(Settings(upstream_url="http://scripted.upstream"), upstream, sink)
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": json.dumps(chat_body()).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    async with app:
        task = asyncio.create_task(app(scope, receive, send))
        while not upstream.calls or (answered and not sent):
            await asyncio.sleep(0.01)
        task.cancel()
        await task  # it ends the request itself: no CancelledError escapes into the server
    if answered:  # the upstream's headers had gone out: the body is left cut, not completed
        assert sent[0]["status"] == 200 and all(m.get("more_body", True) for m in sent[1:])
    else:
        assert sent[0]["status"] == 503
        assert json.loads(sent[1]["body"])["error"]["type"] == "proxy_shutdown"
    (rec,) = sink.records
    assert rec.request["error"] == "interrupted: the proxy is shutting down"
    assert rec.request["status_code"] == (200 if answered else 503)
