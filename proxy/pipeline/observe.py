"""Reading the main response as it is relayed: text, tokens, finish reasons, usage.

The observer only ever reads copies of the bytes the client receives. When the
request is probed it parses events as they arrive (probes need the text so
far); otherwise it just keeps the bytes and parses them once at the end, off
the relay's hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.pipeline.dialect import REASONING_FIELDS, error_message, reasoning_of
from proxy.pipeline.sse import SseReader


@dataclass(slots=True)
class ChoiceText:
    """One choice (sample) of the response as generated so far."""

    index: int
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tokens: int = 0  # content-bearing chunks: one token each on vLLM and SGLang
    finish_reason: str | None = None

    @property
    def content_text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)


@dataclass(slots=True)
class Outcome:
    choices: dict[int, ChoiceText]
    finish_order: list[int]  # choice indices in the order they finished
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    error: str | None = None


def _count(value: Any, otherwise: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else otherwise


# Called with a choice each time its token count reaches a multiple of the probe interval.
OnTokens = Callable[[ChoiceText], None]


class ResponseObserver:
    def __init__(self, kind: str, stream: bool, on_tokens: OnTokens | None = None,
                 interval: int = 64, live: bool = False) -> None:
        self._kind = kind
        self._stream = stream
        self._on_tokens = on_tokens
        self._interval = interval
        self._raw: list[bytes] = []
        # Parsed as it arrives when probed, or when the proxy may have to end it (`live`).
        self._sse = SseReader() if stream and (on_tokens is not None or live) else None
        self._out = Outcome(choices={}, finish_order=[])
        self.envelope: dict[str, Any] = {}  # id, object, created, model of the stream
        self.reasoning_field: str | None = None  # where the server put reasoning text

    def framing(self, sse: bool) -> None:
        """What the response turned out to be: a request for a stream may get a JSON error."""
        if not sse and self._stream:
            self._stream, self._sse = False, None

    def feed(self, chunk: bytes) -> None:
        if self._sse is None:
            self._raw.append(chunk)
            return
        for data in self._sse.feed(chunk):
            self._event(data)

    def live_choice(self, index: int = 0) -> ChoiceText | None:
        """A choice as parsed so far (only while probing: otherwise nothing is parsed yet)."""
        return self._out.choices.get(index)

    def finish(self) -> Outcome:
        """Everything observed; parses buffered bytes (call it off the hot path)."""
        raw, self._raw = b"".join(self._raw), []
        if self._stream:
            if raw:
                self._events(SseReader().feed(raw + b"\n\n"))
        elif raw:
            self._body(raw)
        return self._out

    def _events(self, payloads: list[bytes]) -> None:
        """Many events at once: one JSON parse of them all is several times cheaper."""
        payloads = [p for p in payloads if p != b"[DONE]"]
        try:
            bodies = orjson.loads(b"[" + b",".join(payloads) + b"]")
        except orjson.JSONDecodeError:  # one bad event: fall back to one at a time
            for data in payloads:
                self._event(data)
            return
        for body in bodies:
            self._apply(body)

    def _choice(self, index: int) -> ChoiceText:
        choice = self._out.choices.get(index)
        if choice is None:
            choice = self._out.choices[index] = ChoiceText(index)
        return choice

    def _usage(self, body: dict[str, Any]) -> None:
        usage = body.get("usage")
        if isinstance(usage, dict):  # counts are taken only as counts: the upstream may send anything
            self._out.prompt_tokens = _count(usage.get("prompt_tokens"), self._out.prompt_tokens)
            self._out.completion_tokens = _count(usage.get("completion_tokens"), self._out.completion_tokens)
        if body.get("model") and isinstance(body["model"], str):
            self._out.model = body["model"]

    def _finished(self, choice: ChoiceText, reason: Any) -> None:
        if reason and choice.finish_reason is None:
            choice.finish_reason = str(reason)
            self._out.finish_order.append(choice.index)

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        self._apply(body)

    def _apply(self, body: Any, stream: bool = True) -> None:
        """One stream event (a chunk of text is a token) or a whole response body."""
        if not isinstance(body, dict):
            return
        if (message := error_message(body)) is not None:
            self._out.error = message
            return
        self._usage(body)
        if not self.envelope and "id" in body:  # the same on every chunk of a stream
            self.envelope = {k: body[k] for k in ("id", "object", "created", "model") if k in body}
        for part in body.get("choices") or ():
            choice = self._choice(int(part.get("index", 0)))
            if self._kind == "chat":
                # a stream carries deltas, a whole response one message
                said = part.get("delta") or part.get("message") or {}
                content, reasoning = said.get("content") or "", reasoning_of(said)
            else:
                content, reasoning = part.get("text") or "", ""
            if content or reasoning:
                if reasoning and self.reasoning_field is None:
                    self.reasoning_field = next(n for n in REASONING_FIELDS if said.get(n))
                choice.content.append(content)
                choice.reasoning.append(reasoning)
                choice.tokens += stream
                if stream and self._on_tokens is not None and choice.tokens % self._interval == 0:
                    self._on_tokens(choice)
            self._finished(choice, part.get("finish_reason"))

    def _body(self, raw: bytes) -> None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._out.error = "response body is not JSON"
            return
        self._apply(body, stream=False)
