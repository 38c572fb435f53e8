"""Recorded completions and how a prompt finds them: the pure core of `dynasorctl replay`.

An index over the recorded problems; a recorded text cut into token-sized
pieces; the token position a probe's text prefix stands at; and the reply a
recording gives to a request, a probe or a trial. No I/O: the server is `replay.py`.

A trial (the text before a transition word, continued with the trial file's
inducer) is answered from the trial file by where its word is in the text: the
recorded answer, with a logprob on each of its tokens (the opening brace aside)
whose mean probability is the recorded confidence.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dynasorctl.traces import CotTrace, ScProgram
from dynasorctl.trials import Trials
from proxy.core.policy import ProbeObservation

# Appended to the answer of a probe recorded as uncertain, so the proxy's
# hesitation check sees what the model wrote when it was unsure.
HESITATION_TAIL = " Wait, let me double-check."

# A completions prompt is a probe only if at least this much of a recorded
# text follows the problem: the chat template's own "<think>\n" must not count.
_ANCHOR = 16


# --- the recordings and the index over them ------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedTrial:
    """One trial of a trial file, found by the character offset of its word."""

    chars: int
    answer: str | None
    confidence: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Recording:
    """One recorded completion: a chain-of-thought trace or one sample of a program."""

    model: str
    seed: int | None
    text: str
    completion_tokens: int
    prompt_tokens: int | None
    finish_reason: str
    probes: tuple[ProbeObservation, ...]  # by position
    trials: dict[int, RecordedTrial] | None = None  # by character offset; None: none recorded


def _trials_of(record: CotTrace, trials: Trials | None) -> dict[int, RecordedTrial] | None:
    if trials is None or record.trace_id not in trials.by_trace:
        return None
    return {c: RecordedTrial(c, t.answer, t.confidence or 0.0, t.tokens)
            for t, c in zip(trials.by_trace[record.trace_id], trials.chars[record.trace_id])
            if c is not None}


def _recordings(record: CotTrace | ScProgram, trials: Trials | None = None) -> list[Recording]:
    def probes(observed: Sequence[ProbeObservation]) -> tuple[ProbeObservation, ...]:
        return tuple(sorted(observed, key=lambda p: p.position))

    if isinstance(record, CotTrace):
        return [Recording(record.model, record.seed, record.text, record.completion_tokens,
                          record.prompt_tokens, record.finish_reason, probes(record.probes),
                          _trials_of(record, trials))]
    # Samples answer to their index as seed, so n=1 requests with seeds 0..7 see all eight.
    return [
        Recording(record.model, i, s.text, s.completion_tokens, None,
                  "stop" if s.finished else "length", probes(s.probes))
        for i, s in enumerate(record.samples)
    ]


class ReplayIndex:
    """Recordings grouped by distinct problem, built once at start-up."""

    def __init__(self, records: Sequence[CotTrace] | Sequence[ScProgram],
                 trials: Trials | None = None) -> None:
        self.by_problem: dict[str, list[Recording]] = {}
        self.inducer = trials.setup.inducer if trials is not None else None
        for record in records:
            if record.problem.strip():
                self.by_problem.setdefault(record.problem, []).extend(_recordings(record, trials))
        # Longest first: when one problem's text holds another's, the longer is the one asked.
        self.problems = sorted(self.by_problem, key=len, reverse=True)
        self.models = list(dict.fromkeys(r.model for r in records))

    def problem_in(self, prompt: str) -> str | None:
        """The recorded problem the prompt asks, if any."""
        return next((p for p in self.problems if p in prompt), None)

    def ranked(self, problem: str, model: str | None, seed: int | None) -> list[Recording]:
        """The problem's recordings, best match first: the requested model, then the seed."""
        return sorted(self.by_problem[problem],
                      key=lambda r: (model is not None and r.model != model,
                                     seed is not None and r.seed != seed))


# --- the pure core: pieces, positions, replies -------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """What one choice says: its pieces are streamed one a chunk."""

    pieces: list[str]
    completion_tokens: int
    finish_reason: str
    logprobs: list[float] | None = None  # one a piece, where recorded (trials)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def split_pieces(text: str, tokens: int) -> list[str]:
    """`text` cut proportionally into `tokens` pieces (the model's tokens, approximately)."""
    n = len(text)
    return [text[n * i // tokens : n * (i + 1) // tokens] for i in range(tokens)]


def token_position(chars: int, text_len: int, tokens: int) -> int:
    """How many pieces of `split_pieces(text, tokens)` were out when `chars` characters were.

    This is round(chars * tokens / text_len), made exact: the piece boundary
    nearest `chars` (ties: the later one), since a plain round can land one
    token short of a boundary when tokens are short.
    """
    if tokens <= 0 or text_len <= 0:
        return 0
    def boundary(k: int) -> int:
        return text_len * k // tokens
    k = min(tokens, bisect.bisect_left(range(tokens + 1), chars, key=boundary))
    if k > 0 and chars - boundary(k - 1) < boundary(k) - chars:
        k -= 1
    return k


def rough_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def trace_reply(rec: Recording, max_tokens: int | None) -> Reply:
    """The recorded completion, cut at `max_tokens`."""
    pieces = split_pieces(rec.text, rec.completion_tokens) or [""]
    if max_tokens is not None and rec.completion_tokens > max_tokens:
        return Reply(pieces[:max_tokens], max_tokens, "length")
    return Reply(pieces, rec.completion_tokens, rec.finish_reason)


def probe_reply(rec: Recording, position: int, max_tokens: int | None) -> Reply:
    """The probe answer recorded at or before `position`, as the text after `\\boxed{`.

    Streamed in as many pieces as the probe decoded tokens, so the proxy counts
    what the model spent; when the probe was uncertain the hesitation tail rides
    in the piece that closes the brace, so the proxy's hesitation check sees it.
    """
    at = bisect.bisect_right(rec.probes, position, key=lambda p: p.position)
    probe = rec.probes[at - 1] if at else None
    answer = probe.answer if probe is not None and probe.answer else ""
    text = answer + "}"
    tokens = probe.tokens if probe is not None and probe.tokens > 0 else rough_tokens(text)
    pieces = split_pieces(text, min(tokens, len(text)))
    if probe is not None and probe.hesitant:
        pieces[-1] += HESITATION_TAIL
    if max_tokens is not None and len(pieces) > max_tokens:
        return Reply(pieces[:max_tokens], max_tokens, "length")
    return Reply(pieces, tokens, "stop")


def trial_reply(trial: RecordedTrial | None, max_tokens: int | None) -> Reply:
    """A trial's recorded answer after the opening brace it decodes first.

    Its tokens after that brace carry log(confidence) each, so their mean probability is
    the recorded confidence; a trial nobody recorded gets an empty answer and no logprobs.
    """
    if trial is None:
        return Reply(["{", "}"], 2, "stop")
    body = (trial.answer or "") + "}"
    pieces = ["{", *split_pieces(body, max(1, min(trial.tokens - 1, len(body))))]
    logprob = math.log(trial.confidence) if trial.confidence > 0 else -9999.0
    reply = Reply(pieces, len(pieces), "stop", [0.0] + [logprob] * (len(pieces) - 1))
    if max_tokens is not None and len(pieces) > max_tokens:
        return Reply(pieces[:max_tokens], max_tokens, "length", (reply.logprobs or [])[:max_tokens])
    return reply


def trial_match(ranked: Sequence[Recording], s: str,
                inducer: str | None) -> tuple[Recording, RecordedTrial | None] | None:
    """(recording, its trial) when `s` is a recorded text's prefix continued with `inducer`."""
    if not inducer or not s.endswith(inducer):
        return None
    rec, length, end = continued_text(ranked, s)
    if rec.trials is None or end != len(s) - len(inducer):
        return None
    return rec, rec.trials.get(length)


def _common_prefix(text: str, s: str, start: int) -> int:
    lo, hi = 0, min(len(text), len(s) - start)
    while lo < hi:  # prefix matching is monotone: binary search keeps the scan in C
        mid = (lo + hi + 1) // 2
        if s.startswith(text[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


def continued_text(recs: Sequence[Recording], s: str) -> tuple[Recording, int, int]:
    """Which recorded text `s` continues, and where: (recording, prefix length, end in `s`).

    The longest prefix of any recording's text found in `s`, either at its start
    or where the text's first characters occur (past a chat template, say).
    """
    best = (recs[0], 0, 0)
    for rec in recs:
        anchor, starts = rec.text[:_ANCHOR], {0}
        at = s.find(anchor) if anchor else -1
        while at >= 0:
            starts.add(at)
            at = s.find(anchor, at + 1)
        for start in sorted(starts):
            length = _common_prefix(rec.text, s, start)
            if length > best[1]:
                best = (rec, length, start + length)
    return best


def probe_match(ranked: Sequence[Recording], s: str, strict: bool) -> tuple[Recording, int] | None:
    """(recording, length of its text `s` continues) when `s` is a probe, else None.

    A chat turn that continues the assistant's is always a probe; the rest of a
    completions prompt is one only if it holds recorded text (`strict`) and then
    something more (the suffix).
    """
    rec, length, end = continued_text(ranked, s)
    if strict and not (length >= min(_ANCHOR, len(rec.text)) > 0 and end < len(s)):
        return None
    return rec, length
