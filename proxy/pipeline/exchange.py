"""One request as the proxy handles it, and the small ASGI pieces around it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.core.policy import StopInfo
from proxy.core.treatment import Mode
from proxy.upstream.base import Headers, forwardable

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


async def read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
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
    except ValueError:
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


def probe_headers(headers: Headers) -> Headers:
    """Probes carry the client's credentials, nothing else of its request."""
    out: Headers = [(b"content-type", b"application/json")]
    auth = header(headers, b"authorization")
    if auth is not None:
        out.append((b"authorization", auth.encode("latin-1")))
    return out
