"""The end of a stopped stream, and the `dynasor` field that says what happened.

A stopped stream is completed by the proxy in the upstream's own chunk format:
the reasoning is closed if it was open, the final answer written,
`finish_reason` is `stop`, and an extension field `dynasor` says what happened.
"""

from __future__ import annotations

import json
import time
from typing import Any

from proxy.core.policy import StopInfo


def answer_text(answer: str | None, template: str, generated: str) -> str:
    """The text the proxy writes after the last relayed token: closes an open think block."""
    body = template.format(answer=answer or "")
    if "<think>" in generated and "</think>" not in generated:
        return "\n</think>\n\n" + body
    return "\n\n" + body


def stop_extension(stop: StopInfo, generated_tokens: int) -> dict[str, Any]:
    """The `dynasor` field of a stopped response: where, with which answer, what was generated,
    and where the answer came from (a probe, a trial, or the text: the end of thinking)."""
    return {"stopped": True, "stop_token": stop.position, "answer": stop.answer,
            "generated_tokens": generated_tokens, "reason": stop.reason, "source": stop.source}


def verdict_extension(stop: StopInfo, generated_tokens: int) -> dict[str, Any]:
    """The `dynasor` field of a sample of a tagged program answered by the program's verdict."""
    return {"stopped": True, "program_verdict": True, "samples_read": stop.position,
            "answer": stop.answer, "generated_tokens": generated_tokens, "reason": stop.reason}


def tail_chunks(kind: str, envelope: dict[str, Any], text: str, extension: dict[str, Any],
                generated_tokens: int, prompt_tokens: int | None, include_usage: bool) -> bytes:
    """The SSE events that end a stopped stream, in the upstream's chunk shape, then [DONE]."""
    base = {
        "id": envelope.get("id", "dynasor"),
        "object": envelope.get("object", "chat.completion.chunk" if kind == "chat" else "text_completion"),
        "created": envelope.get("created", int(time.time())),
        "model": envelope.get("model"),
    }
    if kind == "chat":
        body = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        end = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    else:
        body = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        end = {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    events = [{**base, "choices": [body]},
              {**base, "choices": [end], "dynasor": extension}]
    if include_usage:
        usage = {"prompt_tokens": prompt_tokens or 0, "completion_tokens": generated_tokens,
                 "total_tokens": (prompt_tokens or 0) + generated_tokens}
        events.append({**base, "choices": [], "usage": usage})
    out = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events)
    return out + b"data: [DONE]\n\n"
