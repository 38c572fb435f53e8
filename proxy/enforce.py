"""Treatment of a request (observe, shadow, enforce) and the end of a stopped stream.

Who is enforced is decided by a stable hash of the program (or the request), so
every sample of one program gets the same treatment and the same programs are
enforced every time at a given percentage. A stopped stream is completed by the
proxy in the upstream's own chunk format: the reasoning is closed if it was
open, the final answer written, `finish_reason` is `stop`, and an extension
field `dynasor` says what happened.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from proxy.policy import CotPolicy

Mode = Literal["off", "observe", "shadow", "enforce"]
OPT_HEADER = b"x-dynasor"


@dataclass(frozen=True, slots=True)
class Treatment:
    mode: Mode
    policy: CotPolicy | None = None
    policy_name: str | None = None


def in_rollout(key: str, percent: float) -> bool:
    """Whether `key` falls in the first `percent` of a stable hash space (sticky per key)."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return bucket * 100 < percent


def choose(mode: Mode, percent: float, key: str, opt: str | None, allow_opt_in: bool) -> Mode:
    """The mode for one request: the opt-out header always wins; enforce covers `percent`."""
    if opt == "off":
        return "off"
    if mode != "enforce":
        return mode
    if opt == "enforce" and allow_opt_in:
        return "enforce"
    return "enforce" if in_rollout(key, percent) else "shadow"


@dataclass(slots=True)
class StopInfo:
    """What a policy decided for one request: where, with which answer."""

    position: int
    answer: str | None
    reason: str


def answer_text(answer: str | None, template: str, generated: str) -> str:
    """The text the proxy writes after the last relayed token: closes an open think block."""
    body = template.format(answer=answer or "")
    if "<think>" in generated and "</think>" not in generated:
        return "\n</think>\n\n" + body
    return "\n\n" + body


def stop_extension(stop: StopInfo, generated_tokens: int) -> dict[str, Any]:
    """The `dynasor` field of a stopped response: where, with which answer, what was generated."""
    return {"stopped": True, "stop_token": stop.position, "answer": stop.answer,
            "generated_tokens": generated_tokens, "reason": stop.reason}


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
