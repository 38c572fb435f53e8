"""HttpUpstream against a real local HTTP server: headers, keys, errors mapped once."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import pytest
import uvicorn

from proxy.upstream.base import UpstreamError
from proxy.upstream.http import HIGH_WATER, HttpUpstream


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


# -- exact wire cases, against a raw TCP server that writes scripted bytes -------------------

Script = list  # of bytes to write, floats: seconds to wait, "eof": wait for the client to go, None: close


@pytest.fixture
async def raw_server():
    """Serves, per accepted connection, the next script; records what each request sent."""
    scripts: list[Script] = []
    seen: list[bytes] = []
    closed = asyncio.Event()
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while scripts:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                seen.append(head + await reader.readexactly(length))
                for step in scripts.pop(0):
                    if step is None:
                        writer.close()
                        return
                    if step == "eof":
                        await reader.read()
                        closed.set()
                    elif isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            closed.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", scripts, seen, closed, connections
    server.close()
    await server.wait_closed()


CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def test_a_chunked_body_split_anyhow_arrives_whole_and_the_connection_is_kept(raw_server):
    url, scripts, seen, _, connections = raw_server
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    scripts.append([CHUNKED, *(bytes([b]) for b in body)])  # a byte a write
    scripts.append([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"])
    up = HttpUpstream(url)
    try:
        first = await up.send("POST", "/v1/chat/completions", [(b"x-k", b"v")], b"{}")
        assert (first.status, await _read(first)) == (200, b"hello world")
        await first.aclose()
        second = await up.send("GET", "/v1/models", [], b"")
        assert await _read(second) == b"ok"
        await second.aclose()
    finally:
        await up.aclose()
    assert len(seen) == 2 and len(connections) == 1  # both requests on one kept-alive connection
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nx-k: v\r\n" in seen[0] and b"\r\ncontent-length: 2\r\n\r\n{}" in seen[0]


async def test_a_body_ended_by_the_connection_closing_is_complete(raw_server):
    url, scripts, _, _, connections = raw_server
    scripts.append([b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n", 0.05,
                    b"data: 2\n\n", None])
    up = HttpUpstream(url)
    try:
        resp = await up.send("POST", "/", [], b"")
        assert await _read(resp) == b"data: 1\n\ndata: 2\n\n"
    finally:
        await up.aclose()


@pytest.mark.parametrize("script, kind, words", [
    ([CHUNKED, b"5\r\nhel", None], "broken", "broke off the response: the connection closed"),
    ([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", None], "broken", "broke off the response: the connection closed"),
    ([b"NOT HTTP AT ALL\r\n\r\n"], "broken", "malformed"),
    ([CHUNKED, b"5\r\nhello\r\n", 2.0], "timeout", "silent mid-response"),
])
async def test_a_body_cut_short_or_garbled_or_stalled_is_an_upstream_error(raw_server, script, kind, words):
    url, scripts, _, _, connections = raw_server
    scripts.append(script)
    up = HttpUpstream(url, read_timeout_s=0.3)
    try:
        with pytest.raises(UpstreamError) as err:
            await _read(await up.send("POST", "/", [], b""))
    finally:
        await up.aclose()
    assert err.value.kind == kind and words in str(err.value)


async def test_an_interim_response_is_skipped_and_head_gets_no_body(raw_server):
    url, scripts, _, _, connections = raw_server
    scripts.append([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes"])
    scripts.append([b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"])
    up = HttpUpstream(url)
    try:
        resp = await up.send("POST", "/", [], b"")
        assert (resp.status, await _read(resp)) == (200, b"yes")
        await resp.aclose()
        head = await asyncio.wait_for(up.send("HEAD", "/", [], b""), 10)
        assert (head.status, await _read(head)) == (200, b"")
        assert (b"content-length", b"1000") in head.headers
        await head.aclose()
    finally:
        await up.aclose()


async def test_leaving_mid_stream_drops_the_connection(raw_server):
    url, scripts, _, closed, connections = raw_server
    scripts.append([CHUNKED, b"5\r\nhello\r\n", "eof"])
    up = HttpUpstream(url)
    try:
        resp = await up.send("POST", "/", [], b"")
        assert await resp.__anext__() == b"hello"
        await resp.aclose()
        await asyncio.wait_for(closed.wait(), 10)  # the server saw its client go: the engine stops
    finally:
        await up.aclose()


async def test_a_reader_that_falls_behind_pauses_the_upstream(raw_server):
    url, scripts, _, _, connections = raw_server
    piece = b"x" * 65536
    scripts.append([b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (64 * len(piece)), *[piece] * 64])
    up = HttpUpstream(url)
    try:
        resp = await up.send("POST", "/", [], b"")
        await asyncio.sleep(0.5)  # not reading: what is buffered stays bounded
        assert resp._buffered <= HIGH_WATER + 2 * len(piece)
        assert len(await _read(resp)) == 64 * len(piece)  # and nothing is lost
    finally:
        await up.aclose()


async def test_an_idle_connection_the_upstream_closed_is_not_reused(raw_server):
    url, scripts, seen, _, connections = raw_server
    scripts.append([b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na", None])  # answers, then hangs up
    scripts.append([b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"])
    up = HttpUpstream(url)
    try:
        first = await up.send("GET", "/", [], b"")
        assert await _read(first) == b"a"
        await first.aclose()
        for _ in range(200):  # until the hang-up has reached the pooled connection
            if all(c.closed for c in up._idle):
                break
            await asyncio.sleep(0.01)
        second = await up.send("GET", "/", [], b"")
        assert await _read(second) == b"b"
        await second.aclose()
    finally:
        await up.aclose()
    assert len(connections) == 2 and len(seen) == 2


def test_the_host_header_names_the_upstream_as_http_wants():
    def head(url: str) -> bytes:
        return HttpUpstream(url)._head("GET", "/v1/models", [(b"host", b"client-side")], b"")

    assert head("http://[::1]:8000").startswith(b"GET /v1/models HTTP/1.1\r\nhost: [::1]:8000\r\n")
    assert b"\r\nhost: vllm.internal\r\n" in head("http://vllm.internal:80")
    assert head("https://router.example/prefix/").startswith(
        b"GET /prefix/v1/models HTTP/1.1\r\nhost: router.example\r\n")
    assert b"client-side" not in head("http://x")  # the client's Host is the proxy's, not sent on


async def test_an_https_upstream_is_reached_over_tls(tmp_path, monkeypatch):
    """A self-signed certificate, trusted through SSL_CERT_FILE as an operator would."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    up = HttpUpstream(f"https://localhost:{port}")
    try:
        resp = await up.send("GET", "/v1/models", [], b"")
        assert (resp.status, await _read(resp)) == (200, b"secure")
        await resp.aclose()
    finally:
        await up.aclose()
        server.close()
        await server.wait_closed()
