"""AsgiUpstream: an in-process app behind the upstream seam, and closing a response early."""

from __future__ import annotations

import asyncio
import contextvars
import json

import pytest

from proxy.upstream.asgi import AsgiUpstream
from proxy.upstream.base import UpstreamError

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="none")


class App:
    """`/echo` answers with what it got; `/stream` streams until the client leaves (it listens
    for the disconnect as starlette's StreamingResponse does); `/fail` and `/break` fail before
    and during the response."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        self.ended = asyncio.Event()
        self.sent = 0

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._route(scope, receive, send)
        finally:
            self.ended.set()

    async def _route(self, scope, receive, send) -> None:
        message = await receive()
        path = scope["path"]
        if path == "/fail":
            raise RuntimeError("boom")
        if path == "/echo":
            out = {"body": message["body"].decode(), "query": scope["query_string"].decode(),
                   "method": scope["method"], "seen": SEEN.get(),
                   "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}
            await send({"type": "http.response.start", "status": 201,
                        "headers": [(b"Content-Type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(out).encode()})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if path == "/break":
            await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
            raise RuntimeError("broken mid-stream")

        async def stream() -> None:
            while True:
                self.sent += 1
                await send({"type": "http.response.body", "body": f"data: {self.sent}\n\n".encode(),
                            "more_body": True})
                await asyncio.sleep(0.01)

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()

        tasks = [asyncio.create_task(stream()), asyncio.create_task(listen())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def contexts(headers):
    context = contextvars.copy_context()
    value = dict(headers).get(b"x-tag", b"none").decode()
    context.run(SEEN.set, value)
    return context


async def test_status_headers_body_and_query_reach_the_proxy():
    upstream = AsgiUpstream(App(), "engine:test", contexts)
    headers = [(b"content-type", b"application/json"), (b"connection", b"keep-alive"),
               (b"content-length", b"999"), (b"x-tag", b"p1")]
    resp = await upstream.send("POST", "/echo?a=1", headers, b'{"x": 1}')
    body = json.loads(b"".join([c async for c in resp.chunks()]))
    assert resp.status == 201 and (b"content-type", b"application/json") in resp.headers
    assert body["body"] == '{"x": 1}' and body["query"] == "a=1" and body["method"] == "POST"
    # hop-by-hop headers dropped, the length of the body actually sent, the request's context
    assert "connection" not in body["headers"] and body["headers"]["content-length"] == "8"
    assert body["seen"] == "p1"
    await resp.aclose()


async def test_closing_a_stream_tells_the_app_the_client_left_and_waits_for_it():
    app = App()
    upstream = AsgiUpstream(app, "engine:test")
    resp = await upstream.send("POST", "/stream", [], b"")
    got = []
    async for chunk in resp.chunks():
        got.append(chunk)
        if len(got) == 3:
            break
    assert got[0] == b"data: 1\n\n"
    await resp.aclose()
    assert app.disconnected.is_set() and app.ended.is_set()  # let go before aclose returned
    assert not upstream._tasks


async def test_an_app_that_fails_before_answering_is_a_broken_upstream():
    upstream = AsgiUpstream(App(), "engine:test")
    with pytest.raises(UpstreamError) as caught:
        await upstream.send("POST", "/fail", [], b"")
    assert caught.value.kind == "broken" and "boom" in str(caught.value)


async def test_an_app_that_fails_mid_stream_breaks_the_body():
    upstream = AsgiUpstream(App(), "engine:test")
    resp = await upstream.send("POST", "/break", [], b"")
    got = []
    with pytest.raises(UpstreamError):
        async for chunk in resp.chunks():
            got.append(chunk)
    assert got == [b"data: 0\n\n"]


async def test_a_caller_cancelled_before_the_response_starts_closes_it():
    started = asyncio.Event()
    left = asyncio.Event()

    async def slow(scope, receive, send):
        await receive()
        started.set()
        if (await receive())["type"] == "http.disconnect":  # the client left while it worked
            left.set()

    upstream = AsgiUpstream(slow, "engine:test")
    caller = asyncio.create_task(upstream.send("POST", "/slow", [], b""))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert left.is_set() and not upstream._tasks


async def test_closing_the_upstream_cancels_what_still_runs():
    app = App()
    upstream = AsgiUpstream(app, "engine:test")
    await upstream.send("POST", "/stream", [], b"")
    await upstream.aclose()
    assert app.ended.is_set() and not upstream._tasks
