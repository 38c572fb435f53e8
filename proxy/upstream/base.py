"""The upstream seam: one small interface every upstream implements.

`Upstream.send` takes a request and returns a response whose body is read as
raw chunks. `proxy.upstream.http` speaks HTTP to a vLLM or SGLang server; the
serve stage puts an in-process engine behind the same interface. Each upstream
maps its library's errors, once, to `UpstreamError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

Headers = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1 hop-by-hop headers: they describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade",
    }
)
# What the pipeline tells the upstream about each request it sends, for `serve`'s scheduler
# (an HTTP upstream just receives them): the program it belongs to (the client's own
# X-Dynasor-Program, or the pipeline's id for an n > 1 request or a lone request) and what
# kind of job it is (`proxy.scheduler.base.JobKind`: cot, sample, probe, ...).
PROGRAM_HEADER = b"x-dynasor-program"
JOB_HEADER = b"x-dynasor-job"
# The client's own label of its program's type (mcts, rebase, or any): the scheduler learns
# tokens per request and requests per program per type, and aggregates step rewards by it.
PROGRAM_TYPE_HEADER = b"x-dynasor-program-type"

# On the way up the HTTP client sets these itself, for the upstream's address and
# the body it sends.
REQUEST_ONLY = HOP_BY_HOP | {b"host", b"content-length"}


class UpstreamError(Exception):
    """The upstream could not be reached, timed out, or broke off a response."""

    def __init__(self, kind: Literal["connect", "timeout", "broken"], message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def status(self) -> int:
        return 504 if self.kind == "timeout" else 502

    @property
    def error_type(self) -> str:
        """The `type` of the OpenAI-shaped error the client gets."""
        return {"timeout": "upstream_timeout", "connect": "upstream_unavailable"}.get(self.kind,
                                                                                     "upstream_error")


class UpstreamResponse(Protocol):
    status: int
    headers: Headers

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    base_url: str

    async def send(self, method: str, path: str, headers: Headers, body: bytes) -> UpstreamResponse:
        ...

    async def aclose(self) -> None: ...


def forwardable(headers: Headers, drop: frozenset[bytes] = HOP_BY_HOP) -> Headers:
    """Headers minus hop-by-hop ones (lower-cased names, as ASGI gives them).

    A response keeps its content-length: the body is relayed byte for byte.
    """
    return [(k, v) for k, v in headers if k.lower() not in drop]
