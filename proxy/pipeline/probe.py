"""Probes: out-of-band "what would you answer now?" requests to the upstream.

A probe continues the generation so far with a suffix, decodes a few tokens and is
cut off as soon as the answer's braces balance. How (suffix, sampling, most tokens,
logprobs) is the policy's for the probe's kind (`ProbeSettings`: periodic and
statement probes share the policy's `probe`, trials the transition trigger's), else
the proxy's own `probe_*` settings, so the proxy probes as the data the policy was
calibrated on was recorded. With logprobs the answer's confidence is measured
(`proxy.core.confidence`). Probes never touch the main stream: one request's are
taken by its `ProbeSession` (`proxy.pipeline.session`), all under one bound here.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from proxy.core.certaindex import is_hesitant
from proxy.core.confidence import answer_complete, answer_confidence, answer_of, opens_brace
from proxy.core.policy import ProbeSettings, TextSignals
from proxy.metrics import Metrics
from proxy.pipeline.dialect import (
    chat_probe_body,
    completion_probe_body,
    logprobs_request,
    reasoning_of,
    token_logprobs,
)
from proxy.pipeline.programs import NO_SIGNALS, ProgramSignals
from proxy.pipeline.sse import SseReader
from proxy.settings import Settings
from proxy.upstream.base import Headers, Upstream, UpstreamError

# What took a probe: the periodic schedule, an answer statement, a transition word (a
# trial), or a self-consistency sample's check at the policy's `check_tokens`.
ProbeKind = Literal["periodic", "statement", "trial", "check"]
# The chain-of-thought triggers (`CotPolicy.triggers`) this proxy enforces: all of them.
ENFORCED_TRIGGERS: frozenset[str] = frozenset({"periodic", "statement", "transition", "think_end"})


@dataclass(slots=True)
class ProbeResult:
    position: int  # main tokens of the text the probe continued
    answer: str | None
    hesitant: bool
    output_tokens: int
    latency_ms: float | None
    status: str  # ok | error | cancelled
    certaindex: float | None = None
    signals: TextSignals | None = None
    started: float | None = None  # perf_counter() when it was sent, and when it ended (traces)
    ended: float | None = None
    confidence: float | None = None  # the answer's mean token probability; None: not measured
    kind: ProbeKind = "periodic"  # what took it: the schedule, an answer statement, a transition word
    trigger_position: int | None = None  # main tokens when its statement or word was complete


@dataclass(frozen=True, slots=True)
class HowToProbe:
    """A probe's settings with every gap filled from the proxy's."""

    suffix: str
    temperature: float
    top_p: float
    max_tokens: int
    logprobs: bool

    @property
    def brace_open(self) -> bool:
        return opens_brace(self.suffix)

    def sampling(self, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                               "top_p": self.top_p}
        return {**out, **logprobs_request(kind)} if self.logprobs else out


def how_to_probe(settings: ProbeSettings | None, proxy: Settings) -> HowToProbe:
    """`settings` (a policy's) completed with the proxy's; logprobs if either asks for them."""
    s = settings or ProbeSettings()
    return HowToProbe(
        suffix=s.suffix if s.suffix is not None else proxy.probe_suffix,
        temperature=s.temperature if s.temperature is not None else proxy.probe_temperature,
        top_p=s.top_p if s.top_p is not None else proxy.probe_top_p,
        max_tokens=s.max_tokens if s.max_tokens is not None else proxy.probe_max_tokens,
        logprobs=s.logprobs or proxy.probe_logprobs,
    )


class Prober:
    """Sends probes for every request, under one concurrency bound."""

    def __init__(self, upstream: Upstream, settings: Settings, metrics: Metrics,
                 signals: ProgramSignals = NO_SIGNALS) -> None:
        self._upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self.signals = signals  # who hears each probe's certaindex (serve: its scheduler)
        self._slots = asyncio.Semaphore(settings.probe_concurrency)
        self.default = how_to_probe(None, settings)

    async def probe(self, kind: str, request: dict[str, Any], headers: Headers, prefix: str,
                    position: int, how: HowToProbe | None = None) -> ProbeResult:
        how = how or self.default
        sampling = how.sampling(kind)
        if kind == "chat":
            body, path = chat_probe_body(request, prefix, how.suffix, sampling), "/v1/chat/completions"
        else:
            body, path = completion_probe_body(request, prefix, how.suffix, sampling), "/v1/completions"
        async with self._slots:
            started = time.perf_counter()
            output, tokens, logprobs = await self._decode(path, headers, json.dumps(body).encode(),
                                                          kind, how)
        ended = time.perf_counter()
        self.metrics.probe_tokens += tokens
        confidence = answer_confidence(logprobs, how.brace_open) if logprobs is not None else None
        return ProbeResult(position, answer_of(output, how.brace_open), is_hesitant(output), tokens,
                           (ended - started) * 1000, "ok", started=started, ended=ended,
                           confidence=confidence)

    async def _decode(self, path: str, headers: Headers, body: bytes, kind: str,
                      how: HowToProbe) -> tuple[str, int, list[tuple[str, float]] | None]:
        """The probe's output, its tokens, and its tokens' logprobs (None: not all were given)."""
        resp = await self._upstream.send("POST", path, headers, body)
        try:
            if resp.status != 200:
                detail = b"".join([c async for c in resp.chunks()])[:300]
                raise UpstreamError("broken", f"probe got HTTP {resp.status}: {detail!r}")
            reader, parts, tokens = SseReader(), [], 0
            logprobs: list[tuple[str, float]] | None = [] if how.logprobs else None
            async for chunk in resp.chunks():
                for data in reader.feed(chunk):
                    if data == b"[DONE]":
                        continue
                    for part in json.loads(data).get("choices") or ():
                        if kind == "chat":
                            delta = part.get("delta") or {}
                            text = (delta.get("content") or "") + reasoning_of(delta)
                        else:
                            text = part.get("text") or ""
                        if text:
                            parts.append(text)
                            tokens += 1
                        if logprobs is not None and (text or part.get("logprobs") is not None):
                            got = token_logprobs(part, kind)
                            # text without its tokens' logprobs: the answer cannot be measured
                            logprobs = None if got is None or (text and not got) else logprobs + got
                if answer_complete("".join(parts), how.brace_open):
                    break  # the answer is complete; closing the response ends the decode
            return "".join(parts), tokens, logprobs
        finally:
            await resp.aclose()
