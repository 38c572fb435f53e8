"""An OpenAI-compatible server over HTTP/1.1 (vLLM, SGLang, or a router in front of them).

This is the relay's hot path: every body chunk of every stream passes here. So it
is a bare asyncio protocol around httptools' parser (llhttp, which uvicorn uses
too), not a general client: aiohttp spends per chunk a stream-reader buffer, a
read-timeout timer re-armed on every packet and an iterator chain (measured: this
client takes about a quarter less CPU per relayed stream; see docs/results.md). The
parser's body callback hands each chunk to the relay waiting for it, or buffers
it, with back-pressure, while the relay is busy. Silence is watched by one timer
per response that re-arms itself only when it fires. Connections are kept alive
and pooled. Failures are mapped here, once, to `UpstreamError`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

from proxy.upstream.base import REQUEST_ONLY, Headers, UpstreamError
from proxy.upstream.url import parse_upstream

HIGH_WATER = 256 * 1024  # buffered body bytes at which reading from the upstream pauses
IDLE_KEPT = 256  # idle connections kept per upstream
_END = b""  # handed to a waiting reader: the body is complete


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time, through one parser
    (made once: making one per response cost more than parsing it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.response: HttpResponse | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)

    # -- asyncio protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        resp.last = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp.fail(UpstreamError("broken", f"upstream sent malformed HTTP: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.response
        if resp is not None and not resp.complete:
            if exc is None and resp.until_close and resp.head.done():
                resp.finish()  # a body delimited by the connection's end
            else:
                reason = f" ({exc})" if exc else ""
                what = "broke off the response" if resp.head.done() else "closed the connection before answering"
                resp.fail(UpstreamError("broken", f"upstream {what}: the connection closed{reason}"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parser callbacks (httptools), for the response being read ----------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        self.response.headers_complete()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.response.body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.response.message_complete()  # type: ignore[union-attr]


class HttpResponse:
    """A response being read: status and headers once `head` is done, then the body."""

    def __init__(self, conn: _Connection, read_timeout_s: float, no_body: bool,
                 release: Callable[[_Connection, bool], None]) -> None:
        self._conn = conn
        self._release = release  # hands the connection back (kept alive or dropped)
        self._closed = False
        self._loop = conn.loop
        self.parser = conn.parser
        self.status = 0
        self.headers: Headers = []
        self.head: asyncio.Future[None] = self._loop.create_future()
        self.complete = False
        self.until_close = False  # neither a length nor chunked: the body ends with the connection
        self.keep_alive = False  # the connection may carry the next request
        self._no_body = no_body  # a HEAD request's response: headers only
        self._error: UpstreamError | None = None
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[bytes] | None = None
        self._timeout = read_timeout_s
        self.last = self._loop.time()
        self._timer = self._loop.call_at(self.last + read_timeout_s, self._watch)

    # -- from the parser ------------------------------------------------------

    def headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim response: the real one follows
            self.headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()  # here: llhttp resets it at the end
        names = {k for k, _ in self.headers}
        self.until_close = b"content-length" not in names and b"transfer-encoding" not in names \
            and status not in (204, 304)
        if not self.head.done():
            self.head.set_result(None)
        if self._no_body:
            self._conn.close()  # the parser would wait for the body a HEAD answer never has
            self.finish()

    def body(self, body: bytes) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(body)
                return
        self._buffer.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()

    def message_complete(self) -> None:
        if self.status:  # not the end of an interim response
            self.finish()

    # -- the reader's side ----------------------------------------------------

    def finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._timer.cancel()
        self._wake(_END)

    def fail(self, error: UpstreamError) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        self._timer.cancel()
        if not self.head.done():
            self.head.set_exception(error)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _wake(self, value: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _watch(self) -> None:
        """The read timeout: fires once per `read_timeout_s`, not once per chunk."""
        if self.complete or self._error is not None:
            return
        silent = self._loop.time() - self.last
        if silent >= self._timeout:
            what = "mid-response" if self.head.done() else "before answering"
            self.fail(UpstreamError("timeout", f"upstream went silent {what}"))
            self._conn.close()
        else:
            self._timer = self._loop.call_at(self.last + self._timeout, self._watch)

    def chunks(self) -> HttpResponse:
        return self

    def __aiter__(self) -> HttpResponse:
        return self

    async def __anext__(self) -> bytes:
        if self._buffer:  # what came while the relay was busy, in one piece
            chunk = self._buffer.popleft() if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            if self._paused and self._conn.transport is not None:
                self._paused = False
                self._conn.transport.resume_reading()
            return chunk
        if self._error is not None:
            raise self._error
        if self.complete:
            raise StopAsyncIteration
        self._waiter = self._loop.create_future()
        chunk = await self._waiter
        if chunk is _END:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        if not self.complete:
            self._conn.close()  # dropping the connection is how the engine learns to stop
        self._conn.response = None
        self._release(self._conn, self.complete and not self._no_body and self.keep_alive)


class HttpUpstream:
    """An OpenAI-compatible server over HTTP/1.1, with pooled keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
        api_key: str | None = None,
        max_connections: int = 1000,
    ) -> None:
        parsed = parse_upstream(base_url)
        self.base_url = parsed.shown  # credentials never reach a message, a log or the store
        url = urlsplit(parsed.base)
        self._https = url.scheme == "https"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if self._https else 80)
        default = 443 if self._https else 80
        name = f"[{self._host}]" if ":" in self._host else self._host.encode("idna").decode("ascii")
        host_header = name if self._port == default else f"{name}:{self._port}"
        self._prefix = url.path.rstrip("/").encode()
        self._host_header = b"host: " + host_header.encode("ascii") + b"\r\n"
        authorization = f"Bearer {api_key}" if api_key else parsed.authorization
        self._auth = authorization.encode("latin-1") if authorization else None
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._live: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self._https else None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._live.discard(conn)  # the upstream closed it while it was idle
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), self._host, self._port, ssl=self._ssl),
                self._connect_timeout)
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"upstream {self.base_url} timed out") from exc
        except OSError as exc:
            raise UpstreamError("connect", f"upstream {self.base_url} unreachable: {exc}") from exc
        self._live.add(conn)
        return conn

    def _head(self, method: str, path: str, headers: Headers, body: bytes) -> bytes:
        lines = [method.encode("ascii"), b" ", self._prefix, path.encode("latin-1"), b" HTTP/1.1\r\n",
                 self._host_header]
        for k, v in headers:
            name = k.lower()
            if name in REQUEST_ONLY or (self._auth is not None and name == b"authorization"):
                continue
            lines += (k, b": ", v, b"\r\n")
        if self._auth is not None:
            lines += (b"authorization: ", self._auth, b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            lines += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines)

    async def send(self, method: str, path: str, headers: Headers, body: bytes) -> HttpResponse:
        await self._slots.acquire()
        try:
            conn = await self._connect()
        except BaseException:
            self._slots.release()
            raise
        resp = conn.response = HttpResponse(conn, self._read_timeout, method == "HEAD", self._release)
        assert conn.transport is not None
        conn.transport.write(self._head(method, path, headers, body))
        try:
            await resp.head
        except BaseException:  # an error, or the client left while waiting
            await resp.aclose()
            raise
        return resp

    def _release(self, conn: _Connection, reuse: bool) -> None:
        self._slots.release()
        if reuse and not conn.closed and len(self._idle) < IDLE_KEPT:
            self._idle.append(conn)
        else:
            conn.close()
            self._live.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._live):
            conn.close()
        self._live.clear()
        self._idle.clear()
