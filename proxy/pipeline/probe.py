"""Probes: out-of-band "what would you answer now?" requests to the upstream.

A probe continues the generation so far with the probe suffix (ending in
`\\boxed{`), decodes a few tokens at the paper's sampling and is cut off as
soon as the braces balance. Probes never touch the main stream: they run as
their own tasks, at most one in flight per request, under a global bound, and
are cancelled when the main request ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.core.certaindex import close_brace, is_hesitant, probe_answer, probe_certaindex
from proxy.core.policy import (
    CotPolicy,
    ProbeObservation,
    StopInfo,
    TextSignals,
    decide_cot,
    probe_due,
    text_signals,
)
from proxy.metrics import Metrics
from proxy.pipeline.dialect import (
    assistant_prefix,
    chat_probe_body,
    completion_probe_body,
    reasoning_of,
)
from proxy.pipeline.observe import ChoiceText
from proxy.pipeline.programs import NO_SIGNALS, ProgramSignals
from proxy.pipeline.sse import SseReader
from proxy.settings import Settings
from proxy.upstream.base import Headers, Upstream, UpstreamError

log = logging.getLogger(__name__)

# Probe points that may wait for the probe in flight; past this the upstream is
# too slow for the probe schedule and further points are skipped (and counted).
MAX_WAITING = 4
# The chain-of-thought triggers (`CotPolicy.triggers`) this proxy enforces so far; a policy
# using others is still decided on its periodic probes alone.
ENFORCED_TRIGGERS: frozenset[str] = frozenset({"periodic"})


@dataclass(slots=True)
class ProbeResult:
    position: int
    answer: str | None
    hesitant: bool
    output_tokens: int
    latency_ms: float | None
    status: str  # ok | error | cancelled
    certaindex: float | None = None
    signals: TextSignals | None = None
    started: float | None = None  # perf_counter() when it was sent, and when it ended (traces)
    ended: float | None = None


class Prober:
    """Sends probes for every request, under one concurrency bound."""

    def __init__(self, upstream: Upstream, settings: Settings, metrics: Metrics,
                 signals: ProgramSignals = NO_SIGNALS) -> None:
        self._upstream = upstream
        self._settings = settings
        self._metrics = metrics
        self.signals = signals
        self._slots = asyncio.Semaphore(settings.probe_concurrency)
        self.sampling = {
            "max_tokens": settings.probe_max_tokens,
            "temperature": settings.probe_temperature,
            "top_p": settings.probe_top_p,
        }

    def session(self, kind: str, request: dict[str, Any], headers: Headers,
                policy: CotPolicy | None = None, enforcing: bool = False,
                program: str | None = None) -> ProbeSession:
        """`program`: the program the probed request belongs to, told each probe's certaindex."""
        return ProbeSession(self, kind, request, headers, policy, enforcing, program)

    async def probe(self, kind: str, request: dict[str, Any], headers: Headers, prefix: str,
                    position: int) -> ProbeResult:
        suffix = self._settings.probe_suffix
        if kind == "chat":
            body, path = chat_probe_body(request, prefix, suffix, self.sampling), "/v1/chat/completions"
        else:
            body, path = completion_probe_body(request, prefix, suffix, self.sampling), "/v1/completions"
        async with self._slots:
            started = time.perf_counter()
            output, tokens = await self._decode(path, headers, json.dumps(body).encode(), kind)
        ended = time.perf_counter()
        self._metrics.probe_tokens += tokens
        return ProbeResult(position, probe_answer(output), is_hesitant(output), tokens,
                           (ended - started) * 1000, "ok", started=started, ended=ended)

    async def _decode(self, path: str, headers: Headers, body: bytes, kind: str) -> tuple[str, int]:
        resp = await self._upstream.send("POST", path, headers, body)
        try:
            if resp.status != 200:
                detail = b"".join([c async for c in resp.chunks()])[:300]
                raise UpstreamError("broken", f"probe got HTTP {resp.status}: {detail!r}")
            reader, parts, tokens = SseReader(), [], 0
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
                if close_brace("".join(parts))[1]:
                    break  # the answer is complete; closing the response ends the decode
            return "".join(parts), tokens
        finally:
            await resp.aclose()


class ProbeSession:
    """The probes of one request's main choice, and the policy's decision on them.

    With a policy, every finished probe is put to `decide_cot`; the first stop
    is kept in `stop` (shadow: only recorded; enforcing: the relay ends the
    stream). An enforcing session probes only where the policy wants a probe.
    """

    def __init__(self, prober: Prober, kind: str, request: dict[str, Any], headers: Headers,
                 policy: CotPolicy | None = None, enforcing: bool = False,
                 program: str | None = None) -> None:
        self._prober = prober
        self._program = program
        self._kind = kind
        self._request = request
        self._headers = headers
        self._task: asyncio.Task[None] | None = None
        self._waiting: deque[tuple[str, int]] = deque()
        self._pending_position = 0
        self._pending_started: float | None = None
        self.policy = policy
        self.enforcing = enforcing and policy is not None
        self.results: list[ProbeResult] = []
        self.stop: StopInfo | None = None

    def interval(self, probe_interval: int) -> int:
        """How often the observer must call back so no probe point of the policy is missed."""
        if not self.enforcing:
            return probe_interval
        assert self.policy is not None
        step = self.policy.interval
        if self.policy.early_interval is not None:
            step = math.gcd(step, self.policy.early_interval)
        return step

    def _wanted(self, position: int) -> bool:
        taken = len(self.results) + len(self._waiting)
        if not self.enforcing:
            return taken < self._prober._settings.probe_max_per_request
        assert self.policy is not None
        limit = self.policy.max_probes
        return probe_due(self.policy, position) and (limit is None or taken < limit)

    def on_tokens(self, choice: ChoiceText) -> None:
        """Observer callback: the main choice reached another probe point.

        Probe points are taken in order, one probe in flight at a time; points
        that come due meanwhile wait (a few at most), so the policy sees every
        probe it would see in replay.
        """
        if self.stop is not None or not self._wanted(choice.tokens):
            return
        if len(self._waiting) >= MAX_WAITING:
            self._prober._metrics.probes["skipped"] += 1  # the upstream cannot keep up
            return
        if self._kind == "chat":
            prefix = assistant_prefix(choice.reasoning_text, choice.content_text)
        else:
            prefix = choice.content_text
        self._waiting.append((prefix, choice.tokens))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._work())

    async def _work(self) -> None:
        while self._waiting and self.stop is None:
            prefix, position = self._waiting.popleft()
            self._pending_position = position
            await self._run(prefix, position)

    async def _run(self, prefix: str, position: int) -> None:
        metrics = self._prober._metrics
        self._pending_started = time.perf_counter()
        try:
            result = await self._prober.probe(self._kind, self._request, self._headers, prefix, position)
        except asyncio.CancelledError:
            raise
        except (UpstreamError, ValueError) as exc:
            log.warning("probe at %d tokens failed: %s", position, exc)
            metrics.probes["error"] += 1
            self.results.append(ProbeResult(position, None, False, 0, None, "error",
                                            started=self._pending_started, ended=time.perf_counter()))
            return
        metrics.probes["ok"] += 1
        ok = [r for r in self.results if r.status == "ok"] + [result]
        result.certaindex = probe_certaindex([r.answer for r in ok], [r.hesitant for r in ok])
        metrics.observe_certaindex("cot", result.certaindex)
        if self._program is not None:
            self._prober.signals.signal(self._program, result.certaindex)
        if self.policy is not None and self.policy.rule is not None:
            result.signals = text_signals(prefix, result.answer)
        self.results.append(result)
        self._decide(ok)

    def _decide(self, ok: list[ProbeResult]) -> None:
        if self.policy is None or self.stop is not None:
            return
        observed = [ProbeObservation(r.position, r.answer, r.hesitant, r.output_tokens, r.signals) for r in ok]
        decision = decide_cot(self.policy, observed)
        if decision.stop:
            self.stop = StopInfo(ok[-1].position, decision.answer, decision.reason)

    async def close(self) -> None:
        """Cancel the probe in flight, if any (the main request has ended)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._prober._metrics.probes["cancelled"] += 1
            self.results.append(
                ProbeResult(self._pending_position, None, False, 0, None, "cancelled",
                            started=self._pending_started, ended=time.perf_counter())
            )
        self._waiting.clear()
