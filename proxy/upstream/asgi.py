"""An OpenAI-compatible server in this process: an ASGI app called directly, no socket.

`serve` puts vLLM's own OpenAI server app (over an in-process engine) here, so
every route answers exactly as `vllm serve` would, with no HTTP hop. Each
request runs the app in its own task; the response's body chunks reach the
proxy through a queue.

Closing an unfinished response tells the app the client is gone
(`http.disconnect`), as a dropped connection tells a real server: vLLM's
server then cancels the request's generation, which aborts it in the engine
and frees its slot. `aclose` waits until the app has let go of the request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proxy.upstream.base import REQUEST_ONLY, Headers, UpstreamError, forwardable

log = logging.getLogger(__name__)

Asgi = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                 Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

_END = object()  # the body is complete
CLOSE_TIMEOUT_S = 30.0  # how long a closed response may take to let go of the request


class AsgiResponse:
    """One response of the in-process app: status and headers first, then the body.

    The body queue is unbounded: vLLM generates at the engine's pace whoever
    reads, so a bound would only move the buffer, and a response is at most
    `max_tokens` long.
    """

    def __init__(self, name: str) -> None:
        self.status = 0
        self.headers: Headers = []
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._body: asyncio.Queue[object] = asyncio.Queue()
        self._complete = False
        self._gone = asyncio.Event()  # the proxy closed the response
        self._task: asyncio.Task[None] | None = None
        self._name = name

    # -- the app's side ---------------------------------------------------------

    async def receive_after_body(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self._gone.is_set():
            raise OSError("the client closed the response")  # what a server's send does then
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
            if not self._started.done():
                self._started.set_result(None)
        elif message["type"] == "http.response.body":
            if body := message.get("body", b""):
                self._body.put_nowait(bytes(body))
            if not message.get("more_body", False):
                self._complete = True
                self._body.put_nowait(_END)

    def app_ended(self, task: asyncio.Task[None]) -> None:
        """The app's task is done: a response it did not complete is a broken one."""
        if self._complete:
            return
        error = None if task.cancelled() else task.exception()
        if error is not None and not self._gone.is_set():
            log.error("the in-process server failed on %s", self._name, exc_info=error)
        failure = UpstreamError("broken", f"the in-process server failed on {self._name}: "
                                + (repr(error) if error is not None else "no complete response"))
        if not self._started.done():
            self._started.set_exception(failure)
        self._body.put_nowait(failure)

    # -- the proxy's side -------------------------------------------------------

    async def started(self) -> None:
        """Wait for the status and headers; a caller cancelled meanwhile closes the response."""
        try:
            await asyncio.shield(self._started)
        except asyncio.CancelledError:
            await self.aclose()
            raise

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._body.get()
            if item is _END:
                return
            if isinstance(item, UpstreamError):
                raise item
            assert isinstance(item, bytes)
            yield item

    async def aclose(self) -> None:
        """Tell the app the client is gone and wait until it has let go of the request."""
        task = self._task
        if task is None or task.done():
            return
        self._gone.set()
        done, _ = await asyncio.wait([task], timeout=CLOSE_TIMEOUT_S)
        if not done:
            log.error("%s still ran %.0f s after its client left; cancelling it", self._name,
                      CLOSE_TIMEOUT_S)
            task.cancel()


class AsgiUpstream:
    """The `Upstream` seam over an ASGI app in this process.

    `context` (optional) gives each request's task the context it runs in: the
    engine side reads what the pipeline said about the request (its program)
    from there, since vLLM's server does not hand request headers to the engine.
    """

    def __init__(self, app: Asgi, base_url: str,
                 context: Callable[[Headers], contextvars.Context] | None = None) -> None:
        self.app = app
        self.base_url = base_url
        self._context = context
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, method: str, path: str, headers: Headers, body: bytes) -> AsgiResponse:
        route, _, query = path.partition("?")
        out = forwardable(headers, REQUEST_ONLY) + [(b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http",
            # 2.3: the app listens for the disconnect (starlette does from 2.4 only by send errors)
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http",
            "path": route, "raw_path": route.encode(), "query_string": query.encode(),
            "root_path": "", "headers": out,
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
        }
        resp = AsgiResponse(f"{method} {route}")
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await resp.receive_after_body()

        context = self._context(headers) if self._context is not None else None
        task = asyncio.create_task(self.app(scope, receive, resp.send), name=f"dynasor-asgi {route}",
                                   context=context)
        resp._task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(resp.app_ended)
        await resp.started()
        return resp

    async def aclose(self) -> None:
        """Requests still running are cancelled (the engine behind them is shutting down)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT_S)
