"""Whole (non-streamed) responses made by the proxy from the upstream's streams.

Where the proxy must watch a generation as it grows (a non-streamed request in
shadow or enforce, the samples of an enforced self-consistency program), it asks
the upstream for a stream and gives the client the completion it asked for,
assembled from the chunks: the upstream's id, created time and model, each
choice's text (reasoning in the field the server used), finish reason and usage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from proxy.pipeline.observe import ChoiceText
from proxy.pipeline.sse import SseReader


def streaming_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as a stream that ends with a usage chunk (for the token counts)."""
    out = dict(body)
    out["stream"] = True
    options = dict(out["stream_options"]) if isinstance(out.get("stream_options"), dict) else {}
    options["include_usage"] = True
    out["stream_options"] = options
    return out


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        prompt = self.prompt_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


def choice_body(kind: str, index: int, choice: ChoiceText, reasoning_field: str | None,
                extra_text: str = "", finish_reason: str | None = None) -> dict[str, Any]:
    """One choice of a whole response: the text so far plus `extra_text`."""
    finish = finish_reason or choice.finish_reason
    if kind != "chat":
        return {"index": index, "text": choice.content_text + extra_text, "logprobs": None,
                "finish_reason": finish}
    message: dict[str, Any] = {"role": "assistant", "content": choice.content_text + extra_text}
    if choice.reasoning_text:
        message[reasoning_field or "reasoning_content"] = choice.reasoning_text
    message.setdefault("tool_calls", [])
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


def completion(kind: str, envelope: dict[str, Any], choices: list[dict[str, Any]], usage: Usage,
               extension: dict[str, Any] | None = None) -> bytes:
    """The JSON body of a whole chat completion or text completion."""
    body: dict[str, Any] = {
        "id": envelope.get("id", "dynasor"),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": envelope.get("created", int(time.time())),
        "model": envelope.get("model"),
        "choices": choices,
        "usage": usage.as_dict(),
    }
    if extension is not None:
        body["dynasor"] = extension
    return json.dumps(body, ensure_ascii=False).encode()


class SampleStream:
    """What a streaming client of several samples gets: each finished sample's chunks, in turn.

    A sample's chunks are re-indexed to its place among the samples sent (0, 1, ...)
    and carry the first sample's id, so the stream reads as one response; the
    samples' own usage chunks give way to one for the whole request at the end.
    """

    def __init__(self) -> None:
        self.envelope: dict[str, Any] = {}
        self.sent = 0

    def sample(self, chunks: list[bytes]) -> bytes:
        index, self.sent = self.sent, self.sent + 1
        out = []
        for data in SseReader().feed(b"".join(chunks) + b"\n\n"):
            if data == b"[DONE]":
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict) or not event.get("choices"):
                continue
            if not self.envelope:
                self.envelope = {k: event[k] for k in ("id", "object", "created", "model") if k in event}
            event.update(self.envelope)
            for part in event["choices"]:
                part["index"] = index
            out.append(_frame(event))
        return b"".join(out)

    def end(self, usage: Usage | None, extension: dict[str, Any] | None) -> bytes:
        """The last event (usage and the `dynasor` field, where wanted), then [DONE]."""
        event: dict[str, Any] = {**self.envelope, "choices": []}
        if usage is not None:
            event["usage"] = usage.as_dict()
        if extension is not None:
            event["dynasor"] = extension
        last = _frame(event) if usage is not None or extension is not None else b""
        return last + b"data: [DONE]\n\n"


def _frame(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
