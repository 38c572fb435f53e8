"""A fast fake vLLM for the proxy benchmark: fixed answers, no model, counted requests.

- `POST /v1/chat/completions` answers a fixed chat completion JSON, or with
  `"stream": true` a role chunk, `STREAM_TOKENS` content chunks and a finish chunk
  in vLLM's shape, then `data: [DONE]`; each event is its own write.
- A probe (a chat request whose last message is an assistant message, with
  `continue_final_message: true`) gets a short SSE stream that closes the
  box: `42}`.
- Between two events of a stream it yields to the event loop, as an engine emits
  one token per running sequence per step; so concurrent streams interleave and a
  proxy that keeps up reads the events one by one. `step=False` (`--burst`)
  sends a whole stream in one burst of writes instead, which a proxy reads in a
  handful of pieces: a far lighter load than a real engine's.
- `GET /stats` says how many requests, streams and probes it has answered, so the
  benchmark can tell the probes' own upstream traffic apart.

Run it as its own process: `python -m dynasorctl.bench.fake_upstream --port 8000`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MODEL = "bench-model"
STREAM_TOKENS = 64
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    return _event({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    })


def chat_completion() -> bytes:
    """The fixed non-streamed answer."""
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "6 * 7 = \\boxed{42}"},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 18, "completion_tokens": 9, "total_tokens": 27},
    }).encode()


def chat_stream(tokens: int = STREAM_TOKENS) -> list[bytes]:
    """The events of a streamed answer: role, `tokens` content chunks, finish, [DONE]."""
    usage = {"prompt_tokens": 18, "completion_tokens": tokens, "total_tokens": 18 + tokens}
    return [
        _chunk({"role": "assistant", "content": ""}),
        *(_chunk({"content": f" t{i}"}) for i in range(tokens)),
        _chunk({}, "stop", usage=usage),
        b"data: [DONE]\n\n",
    ]


def probe_stream() -> list[bytes]:
    """A probe's answer: the rest of `\\boxed{` a token a chunk, then [DONE]."""
    return [*(_chunk({"content": t}) for t in ("4", "2", "}")), _chunk({}, "stop"),
            b"data: [DONE]\n\n"]


def is_probe(body: dict[str, Any]) -> bool:
    """A chat request that continues an assistant turn: what the proxy's probes look like."""
    messages = body.get("messages")
    return (
        body.get("continue_final_message") is True
        and isinstance(messages, list) and bool(messages)
        and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    )


@dataclass
class Stats:
    requests: int = 0
    streams: int = 0
    probes: int = 0


class FakeUpstream:
    """The raw ASGI app (no framework: the fake must cost as little as possible)."""

    def __init__(self, stream_tokens: int = STREAM_TOKENS, step: bool = True) -> None:
        self.stats = Stats()
        self._step = step
        self._completion = chat_completion()
        self._completion_headers = [*JSON_HEADERS,
                                    (b"content-length", str(len(self._completion)).encode())]
        self._stream = chat_stream(stream_tokens)
        self._probe = probe_stream()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(receive, send)
        elif path == "/stats" and method == "GET":
            await _respond(send, 200, json.dumps(asdict(self.stats)).encode(), JSON_HEADERS)
        elif path == "/health" and method == "GET":
            await _respond(send, 200, b"{}", JSON_HEADERS)
        else:
            await _respond(send, 404, b'{"error":{"message":"not found"}}', JSON_HEADERS)

    async def _chat(self, receive: Receive, send: Send) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw)
        except ValueError:
            await _respond(send, 400, b'{"error":{"message":"body is not JSON"}}', JSON_HEADERS)
            return
        self.stats.requests += 1
        if not isinstance(body, dict) or not body.get("stream"):
            await _respond(send, 200, self._completion, self._completion_headers)
            return
        if is_probe(body):
            self.stats.probes += 1
            events = self._probe
        else:
            self.stats.streams += 1
            events = self._stream
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
            if self._step:
                await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stream-tokens", type=int, default=STREAM_TOKENS)
    parser.add_argument("--burst", action="store_true", help="send each stream in one burst")
    args = parser.parse_args(argv)
    import uvicorn

    app = FakeUpstream(args.stream_tokens, step=not args.burst)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop",
                http="httptools", lifespan="off", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
