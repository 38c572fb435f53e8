"""HttpUpstream against a real local HTTP server: headers, keys, errors mapped once."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import pytest
import uvicorn

from proxy.upstream.base import UpstreamError
from proxy.upstream.http import HttpUpstream


async def echo(scope, receive, send):
    """Answers with what it was sent; `/slow` never answers; `/sse` streams three events."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(2)  # longer than the read timeout under test
    headers = [(b"content-type", b"application/json"), (b"x-echo", b"1")]
    if scope["path"] == "/sse":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    seen = {k.decode(): v.decode() for k, v in scope["headers"]}
    out = json.dumps({"headers": seen, "body": body.decode(), "path": scope["path"],
                      "query": scope["query_string"].decode()}).encode()
    await send({"type": "http.response.start", "status": 207, "headers": headers})
    await send({"type": "http.response.body", "body": out})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def server():
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(echo, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    await task


async def _read(resp) -> bytes:
    return b"".join([c async for c in resp.chunks()])


async def test_forwards_headers_and_body_and_returns_status(server):
    up = HttpUpstream(server)
    try:
        resp = await up.send("POST", "/v1/x?a=1", [(b"authorization", b"Bearer c"), (b"x-k", b"v"),
                                                     (b"connection", b"close"), (b"host", b"elsewhere")], b"hi")
        data = json.loads(await _read(resp))
    finally:
        await up.aclose()
    assert resp.status == 207
    assert (b"x-echo", b"1") in resp.headers
    assert data["body"] == "hi" and data["path"] == "/v1/x" and data["query"] == "a=1"
    assert data["headers"]["authorization"] == "Bearer c" and data["headers"]["x-k"] == "v"
    assert "user-agent" not in data["headers"]  # nothing added that the client did not send


async def test_configured_key_replaces_the_clients(server):
    up = HttpUpstream(server, api_key="sk-up")
    try:
        data = json.loads(await _read(await up.send("POST", "/", [(b"authorization", b"Bearer c")], b"")))
    finally:
        await up.aclose()
    assert data["headers"]["authorization"] == "Bearer sk-up"


async def test_streams_chunks_as_they_come(server):
    up = HttpUpstream(server)
    try:
        body = await _read(await up.send("GET", "/sse", [], b""))
    finally:
        await up.aclose()
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_refused_connection_maps_to_connect_error():
    up = HttpUpstream(f"http://127.0.0.1:{_free_port()}")
    try:
        with pytest.raises(UpstreamError) as err:
            await up.send("GET", "/", [], b"")
    finally:
        await up.aclose()
    assert err.value.kind == "connect" and err.value.status == 502
    assert "unreachable" in str(err.value)


async def test_silent_upstream_maps_to_timeout(server):
    up = HttpUpstream(server, read_timeout_s=0.3)
    try:
        with pytest.raises(UpstreamError) as err:
            await _read(await up.send("GET", "/slow", [], b""))
    finally:
        await up.aclose()
    assert err.value.kind == "timeout" and err.value.status == 504


async def test_credentials_in_the_url_become_basic_auth_and_a_v1_suffix_is_dropped(server):
    secret_url = server.replace("http://", "http://ops:s%3Acret@") + "/v1/"
    up = HttpUpstream(secret_url)
    try:
        resp = await up.send("POST", "/v1/chat/completions", [(b"authorization", b"Bearer client")], b"")
        data = json.loads(await _read(resp))
    finally:
        await up.aclose()
    assert data["path"] == "/v1/chat/completions"  # not /v1/v1/...
    assert data["headers"]["authorization"] == "Basic " + base64.b64encode(b"ops:s:cret").decode()
    assert up.base_url == server.replace("http://", "http://ops:***@")


async def test_errors_name_the_upstream_without_its_password():
    up = HttpUpstream(f"http://ops:s3cret@127.0.0.1:{_free_port()}")
    try:
        with pytest.raises(UpstreamError) as err:
            await up.send("GET", "/", [], b"")
    finally:
        await up.aclose()
    assert "s3cret" not in str(err.value) and "ops:***@127.0.0.1" in str(err.value)
