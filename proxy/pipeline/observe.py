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
from proxy.pipeline.sse import SseReader, payload_array


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
        if self._sse is None:
            # Nothing parsed on the way: feeding a chunk is a bare list append (once per chunk
            # on the relay path, so no Python call of our own).
            self.feed = self._raw.append  # type: ignore[method-assign]

    def framing(self, sse: bool) -> None:
        """What the response turned out to be: a request for a stream may get a JSON error."""
        if not sse and self._stream:
            self._stream, self._sse = False, None

    def feed(self, chunk: bytes) -> None:
        """Take a copy of a chunk the client is sent (parsed now only when live)."""
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
        raw = b"".join(self._raw)
        self._raw.clear()  # in place: `feed` may be bound to it
        if self._stream:
            if raw:
                self._events(raw)
        elif raw:
            self._body(raw)
        return self._out

    def _events(self, raw: bytes) -> None:
        """A whole stream at once: one JSON parse of all its events is several times cheaper."""
        array = payload_array(raw)
        if array is None:  # not the plain shape: read it event by event
            payloads = [p for p in SseReader().feed(raw + b"\n\n") if p != b"[DONE]"]
            array = b"[" + b",".join(payloads) + b"]"
        try:
            bodies = orjson.loads(array)
        except orjson.JSONDecodeError:  # one bad event: fall back to one at a time
            for data in SseReader().feed(raw + b"\n\n"):
                self._event(data)
            return
        for body in bodies:
            self._apply(body)

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):  # counts are taken only as counts: the upstream may send anything
            self._out.prompt_tokens = _count(usage.get("prompt_tokens"), self._out.prompt_tokens)
            self._out.completion_tokens = _count(usage.get("completion_tokens"), self._out.completion_tokens)

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        self._apply(body)

    def _apply(self, body: Any, stream: bool = True) -> None:
        """One stream event (a chunk of text is a token) or a whole response body.

        The hot loop of recording: run once per event, so lookups are inlined.
        """
        if not isinstance(body, dict):
            return
        out = self._out
        if ("error" in body or body.get("object") == "error") and (
                message := error_message(body)) is not None:
            out.error = message
            return
        usage = body.get("usage")
        if usage is not None:
            self._usage(usage)
        model = body.get("model")
        if model and model.__class__ is str:
            out.model = model
        if not self.envelope and "id" in body:  # the same on every chunk of a stream
            self.envelope = {k: body[k] for k in ("id", "object", "created", "model") if k in body}
        choices = out.choices
        chat = self._kind == "chat"
        for part in body.get("choices") or ():
            index = int(part.get("index", 0))
            choice = choices.get(index)
            if choice is None:
                choice = choices[index] = ChoiceText(index)
            if chat:
                # a stream carries deltas, a whole response one message
                said = part.get("delta") or part.get("message") or {}
                content = said.get("content") or ""
                reasoning = said.get("reasoning_content") or said.get("reasoning") or ""
                if reasoning.__class__ is not str:
                    reasoning = reasoning_of(said)
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
            reason = part.get("finish_reason")
            if reason and choice.finish_reason is None:
                choice.finish_reason = str(reason)
                out.finish_order.append(index)

    def _body(self, raw: bytes) -> None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._out.error = "response body is not JSON"
            return
        self._apply(body, stream=False)
