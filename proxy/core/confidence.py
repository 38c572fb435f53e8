"""A probe's answer and its confidence, read from what the probe decoded.

A probe continues the text with a suffix; either the suffix opens the brace the
answer goes in (the paper's ends with `\\boxed{`) or the probe decodes it (DEER's
inducer ends with `\\boxed`). The answer is what follows the opening brace, braces
balanced. Its confidence is the mean token probability of the answer and its
closing brace: the mean of exp(logprob) over the tokens decoded after the opening
brace, up to and including the token that closes it, as the shared trial data
define it (a token that holds the opening brace and the answer's first characters
counts). No logprobs, or an answer that never closes, has no confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from proxy.core.certaindex import close_brace

# (token text, logprob) as the upstream reported them, in decoding order.
TokenLogprob = tuple[str, float]


def opens_brace(suffix: str) -> bool:
    """Whether a probe suffix opens the answer's brace itself (else the probe decodes it)."""
    return suffix.endswith("{")


def answer_text(output: str, brace_open: bool) -> tuple[str, bool] | None:
    """What follows the opening brace in `output`, and whether the braces balanced.

    None when the brace is not open yet (the probe has not decoded it).
    """
    if not brace_open:
        at = output.find("{")
        if at < 0:
            return None
        output = output[at + 1:]
    return close_brace(output)


def answer_of(output: str, brace_open: bool) -> str | None:
    """The answer a probe's output gives (balanced-brace content), or None if none."""
    read = answer_text(output, brace_open)
    return (read[0].strip() or None) if read is not None else None


def answer_complete(output: str, brace_open: bool) -> bool:
    """Whether the answer's brace has closed (the probe can be cut off)."""
    read = answer_text(output, brace_open)
    return read is not None and read[1]


def answer_confidence(tokens: Sequence[TokenLogprob], brace_open: bool) -> float | None:
    """The mean probability of the answer's tokens and its closing brace (None: not measurable)."""
    depth = 1 if brace_open else 0
    probs: list[float] = []
    for text, logprob in tokens:
        counted = False
        for ch in text:
            if depth == 0:  # before the answer: only the opening brace matters
                if ch == "{":
                    depth = 1
                continue
            counted = True
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
        if counted:
            if not math.isfinite(logprob) and logprob != -math.inf:
                return None
            probs.append(math.exp(logprob))
            if depth == 0:
                return sum(probs) / len(probs)
    return None
