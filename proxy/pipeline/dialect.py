"""Where vLLM and SGLang differ on the wire, handled in one place.

- Reasoning text: vLLM (reasoning parser on) streams it in `reasoning_content`
  (older releases) or `reasoning` (newer); SGLang in `reasoning_content`. Both
  are read, so the text the proxy probes is the whole generation.
- Continuing an assistant turn (probes on chat): both accept
  `continue_final_message: true` with `add_generation_prompt: false`.
- Errors: vLLM nests them under `"error"`; SGLang sends them flat
  (`{"object": "error", "message": ...}`). `error_message` reads either.
- SGLang adds `matched_stop`, `metadata`, `usage.reasoning_tokens` and, with
  `include_usage`, a last chunk with `choices: []`: all passed through untouched.
- Logprobs (probes that measure confidence): both servers take `logprobs: true` on
  chat and `logprobs: 0` (no alternatives) on completions, and stream each chunk's
  tokens in `logprobs.content[]` (`token`, `logprob`) and `logprobs.tokens` /
  `logprobs.token_logprobs` respectively. `token_logprobs` reads either; anything
  else (absent, null, mistyped) reads as not measured.
"""

from __future__ import annotations

import math
from typing import Any

REASONING_FIELDS = ("reasoning_content", "reasoning")

# Request fields that shape the rendered prompt, so probes keep the prompt's
# prefix (and the upstream's prefix cache) identical to the main request's.
PROMPT_SHAPING_FIELDS = ("tools", "chat_template", "chat_template_kwargs", "documents")


def reasoning_of(part: dict[str, Any]) -> str:
    """The reasoning text in a message or delta, whichever field the server used."""
    for name in REASONING_FIELDS:
        value = part.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def error_message(body: Any) -> str | None:
    """The message of an error body in either server's shape, else None."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict) and "message" in err:
        return str(err["message"])
    if body.get("object") == "error" and "message" in body:
        return str(body["message"])
    if isinstance(err, str):
        return err
    return None


def assistant_prefix(reasoning: str, content: str) -> str:
    """The generation so far as the text of a continued assistant turn."""
    if not reasoning:
        return content
    # The server split the thinking off with its reasoning parser; put it back
    # in the think block the model wrote it in.
    closed = "\n</think>\n\n" + content if content else ""
    return "<think>\n" + reasoning + closed


def chat_probe_body(request: dict[str, Any], prefix: str, suffix: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """A chat request that continues `prefix` + `suffix` as the assistant's own turn."""
    body: dict[str, Any] = {
        "model": request.get("model"),
        "messages": [*request["messages"], {"role": "assistant", "content": prefix + suffix}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "stream": True,
        "n": 1,
        **sampling,
    }
    for name in PROMPT_SHAPING_FIELDS:
        if name in request:
            body[name] = request[name]
    return body


def completion_probe_body(request: dict[str, Any], prefix: str, suffix: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """A completion request whose prompt is the original prompt + `prefix` + `suffix`."""
    return {
        "model": request.get("model"),
        "prompt": request["prompt"] + prefix + suffix,
        "stream": True,
        "n": 1,
        **sampling,
    }


def logprobs_request(kind: str) -> dict[str, Any]:
    """The request fields that make a probe's tokens come with their logprobs."""
    return {"logprobs": True} if kind == "chat" else {"logprobs": 0}


def token_logprobs(part: dict[str, Any], kind: str) -> list[tuple[str, float]] | None:
    """(token, logprob) of the tokens one streamed choice carries; None if not given as expected."""
    block = part.get("logprobs")
    if not isinstance(block, dict):
        return None
    if kind == "chat":
        entries = block.get("content")
        if not isinstance(entries, list):
            return None
        pairs = [(e.get("token"), e.get("logprob")) for e in entries if isinstance(e, dict)]
        if len(pairs) != len(entries):
            return None
    else:
        tokens, logprobs = block.get("tokens"), block.get("token_logprobs")
        if not isinstance(tokens, list) or not isinstance(logprobs, list) or len(tokens) != len(logprobs):
            return None
        pairs = list(zip(tokens, logprobs))
    out = []
    for token, logprob in pairs:
        if not isinstance(token, str) or isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
            return None
        if math.isnan(logprob) or logprob > 1e-6:  # float noise above 0 is 0; more is no logprob
            return None
        out.append((token, min(0.0, float(logprob))))
    return out
