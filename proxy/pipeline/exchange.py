"""One request as the proxy handles it, and the small ASGI pieces around it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.core.policy import StopInfo
from proxy.core.treatment import Mode
from proxy.pipeline.sse import error_body, error_frame
from proxy.upstream.base import JOB_HEADER, PROGRAM_HEADER, Headers, forwardable

if TYPE_CHECKING:
    from proxy.control.plan import Plan
    from proxy.pipeline.observe import ResponseObserver
    from proxy.pipeline.samples import ProgramResult
    from proxy.pipeline.session import ProbeSession

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
ENFORCED = (b"x-dynasor-mode", b"enforce")  # the response header of an enforced request
T = TypeVar("T")
END_EARLY_TIMEOUT_S = 2.0  # longest wait to tell a client its response ends early


@dataclass
class Exchange:
    """What one relayed request produced, for the record."""

    request_id: str
    kind: str
    body: dict[str, Any] | None
    started: float
    observer: ResponseObserver | None
    probes: ProbeSession | None
    program_id: str | None
    status: int = 0
    error: str | None = None
    ttft_s: float | None = None
    finished: float = 0.0
    mode: Mode = "observe"
    plan: Plan | None = None
    enforced: StopInfo | None = None  # set when the proxy ended the stream itself
    assembled: bool = False  # a non-streamed request the proxy answers from an upstream stream
    program: ProgramResult | None = None  # the samples of a request run under a self-consistency policy
    member: bool = False  # one sample of a tagged program under a self-consistency policy
    client_headers: Headers = field(default_factory=list)  # the request's, as the client sent them
    recorded: bool = False  # counted and handed to the recorder (once)
    affinity: tuple[bytes, bytes] | None = None  # the router's session header, on every upstream call

    @property
    def program_key(self) -> str:
        """The program this request belongs to: its tag, or itself."""
        return self.program_id or self.request_id

    @property
    def job_kind(self) -> str:
        """What the upstream's scheduler sees: one sample of a program, or a lone chain of thought."""
        return "sample" if self.program_id is not None else "cot"


class Departure:
    """Watches for the client going away; then cancels the task serving it."""

    def __init__(self, receive: Receive) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._me = me
        self.gone = False
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._me.cancel()

    def left(self, ex: Exchange) -> None:
        """Called on cancellation: a departed client ends the request; anything else goes on."""
        if not self.gone:
            raise asyncio.CancelledError
        self._me.uncancel()
        ex.error, ex.status = "client disconnected", 499

    def stop(self) -> None:
        self._watcher.cancel()


def written_headers(upstream: Headers, enforced: bool, content_type: Headers = ()) -> Headers:
    """Headers of a body the proxy wrote itself: the upstream's, with `content_type` in place of
    its own where given and no content length (the body differs), marked when enforced."""
    drop = {b"content-length", *(k for k, _ in content_type)}
    out = [*content_type, *((k, v) for k, v in forwardable(upstream) if k not in drop)]
    if enforced:
        out.append(ENFORCED)
    return out


async def respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """A whole response at once."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Response:
    """The ASGI `send` of one request, remembering what the client has been sent."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.complete = False
        self.sse = False

    async def __call__(self, message: dict[str, Any]) -> None:
        await self._send(message)
        if message["type"] == "http.response.start":
            self.started = True
            self.sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                           for k, v in message.get("headers", ()))
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.complete = True


async def end_early(send: Response, message: str, type_: str, code: int) -> int | None:
    """End a response the proxy cannot finish as planned; the status sent, if it sent one.

    Nothing sent yet: an OpenAI-shaped error. A stream under way: an error event and
    `[DONE]`. A body under way: left incomplete, so the client sees it cut (the server
    closes the connection) instead of a shorter body passed off as whole.
    """
    if send.complete:
        return None
    try:
        async with asyncio.timeout(END_EARLY_TIMEOUT_S):  # a client that stopped reading
            if not send.started:
                await respond(send, code, error_body(message, type_, code), JSON_HEADERS)
                return code
            if send.sse:
                await send({"type": "http.response.body", "body": error_frame(message, type_, code),
                            "more_body": False})
    except (TimeoutError, OSError):
        pass
    return None


async def told(me: asyncio.Task[Any], telling: Awaitable[T]) -> T | None:
    """Tell the client how its request ended; a cancellation meanwhile (a second signal)
    cuts the telling short, not the recording that follows."""
    try:
        return await telling
    except asyncio.CancelledError:
        me.uncancel()
        return None


class BodyTimeout(Exception):
    """The client sent less of its body than it announced and then nothing for too long."""


async def read_body(receive: Receive, timeout_s: float | None = None) -> bytes:
    """The whole request body; BodyTimeout when the next piece is `timeout_s` late."""
    parts = []
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(f"request body incomplete: {sum(map(len, parts))} bytes received, "
                              f"then nothing for {timeout_s:g} s") from None
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


def json_object(raw: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object, or None (it is still forwarded untouched)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python can read
        return None
    return body if isinstance(body, dict) else None


def wants_usage(ex: Exchange) -> bool:
    """Whether the response the client gets carries usage (a whole one always does)."""
    body = ex.body or {}
    options = body.get("stream_options")
    return not body.get("stream") or (isinstance(options, dict) and bool(options.get("include_usage")))


def assemblable(body: dict[str, Any], mode: Mode) -> bool:
    """Whether a non-streamed request is answered from an upstream stream so the policy can
    watch it: in shadow and enforce, unless it asks for what the proxy does not assemble."""
    return mode in ("shadow", "enforce") and not any(
        body.get(name) for name in ("tools", "functions", "logprobs", "top_logprobs", "echo"))


def header(headers: Headers, name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def job_headers(headers: Headers, program: str, kind: str) -> Headers:
    """`headers` with what an upstream that schedules programs needs (`serve`'s engine): the
    program the request belongs to and its kind of job (see `proxy.upstream.base`)."""
    out = [(k, v) for k, v in headers if k not in (PROGRAM_HEADER, JOB_HEADER)]
    return out + [(PROGRAM_HEADER, program.encode("latin-1")), (JOB_HEADER, kind.encode("latin-1"))]


def probe_headers(headers: Headers, program: str, affinity: tuple[bytes, bytes] | None = None) -> Headers:
    """Probes carry the client's credentials, the request's session header and their program,
    nothing else of its request."""
    out: Headers = [(b"content-type", b"application/json")]
    auth = header(headers, b"authorization")
    if auth is not None:
        out.append((b"authorization", auth.encode("latin-1")))
    if affinity is not None:
        out.append(affinity)
    return job_headers(out, program, "probe")


def affinity_of(headers: Headers, name: str | None, key: str) -> tuple[bytes, bytes] | None:
    """The header a router pins a session by (`name`; None: no router to pin) for one request:
    the client's own value if it sent one, else `key` (its program, else the request), so the
    request, its samples and its probes reach the replica whose prefix cache holds them."""
    if not name:
        return None
    lower = name.lower().encode("latin-1")
    value = header(headers, lower)
    return lower, (key if value is None else value).encode("latin-1")


def pinned(headers: Headers, affinity: tuple[bytes, bytes] | None) -> Headers:
    """The client's headers with the session header added (a client's own is kept as sent)."""
    if affinity is None or any(k == affinity[0] for k, _ in headers):
        return headers
    return [*headers, affinity]
