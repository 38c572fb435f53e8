"""A scripted upstream for exact edge cases: what the proxy is sent, and what it gets back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.upstream.base import Headers, UpstreamError

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
JSON = [(b"content-type", b"application/json")]


@dataclass
class FakeResponse:
    status: int = 200
    headers: Headers = field(default_factory=lambda: list(JSON))
    parts: list[bytes] = field(default_factory=list)
    delay_s: float = 0.0
    fail_after: int | None = None  # raise an upstream error before this part
    fail_kind: str = "broken"  # its kind: "broken" (reset) or "timeout" (went silent)
    closed: bool = False
    sent: int = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for i, part in enumerate(self.parts):
            if self.fail_after is not None and i == self.fail_after:
                raise UpstreamError(self.fail_kind, "upstream went silent mid-response" if self.fail_kind == "timeout"
                                    else "upstream broke off the response: reset")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            else:
                await asyncio.sleep(0)
            self.sent += 1
            yield part

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class Call:
    method: str
    path: str
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


Handler = Callable[[Call], "FakeResponse | Exception"]


class ScriptedUpstream:
    base_url = "http://scripted.upstream"

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls: list[Call] = []
        self.responses: list[FakeResponse] = []

    async def send(self, method: str, path: str, headers: Headers, body: bytes) -> FakeResponse:
        call = Call(method, path, headers, body)
        self.calls.append(call)
        result = self.handler(call)
        if isinstance(result, Exception):
            raise result
        self.responses.append(result)
        return result

    async def aclose(self) -> None:
        pass

    def probe_calls(self) -> list[Call]:
        return [c for c in self.calls if b"continue_final_message" in c.body or b"boxed{" in c.body]


def sse(events: list[dict[str, Any]], done: bool = True) -> list[bytes]:
    out = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


def chat_stream(pieces: list[str], finish: str = "stop", model: str = "m", index: int = 0,
                reasoning: bool = False) -> list[bytes]:
    """vLLM-shaped chat chunks: role first, a piece a chunk, then the finish reason."""
    field_ = "reasoning_content" if reasoning else "content"
    events: list[dict[str, Any]] = [{"id": "c1", "object": "chat.completion.chunk", "model": model,
                                     "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]}]
    events += [{"id": "c1", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": index, "delta": {field_: p}, "finish_reason": None}]} for p in pieces]
    events.append({"id": "c1", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": index, "delta": {}, "finish_reason": finish}]})
    return sse(events)


def probe_reply(pieces: str | list[str]) -> FakeResponse:
    """A streamed probe answer: a piece a chunk (a string: a character a chunk)."""
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    return FakeResponse(headers=list(SSE), parts=sse(events))
