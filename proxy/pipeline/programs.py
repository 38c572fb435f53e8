"""Self-consistency programs: samples of one problem, and their answer-entropy certaindex.

A program is either one request with `n > 1` or several requests that share
an `X-Dynasor-Program` header. After each finished sample, its answer joins the
program's answers, equivalent answers are grouped (math-aware, off the event
loop) and certaindex = 1 - H/log(n) is recorded. Under a self-consistency policy
a tagged program gets a verdict once the policy stops: the majority answer of
the samples read so far, which answers the program's later samples.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from proxy.core.certaindex import entropy_certaindex, group_sizes
from proxy.core.policy import ScPolicy, decide_sc
from proxy.metrics import Metrics
from proxy.pipeline.equivalence import AsyncEquivalence


class ProgramSignals(Protocol):
    """Whoever schedules programs hears how each one converges (`serve`: its admission, which
    tells the scheduler; the proxy: nobody, `NO_SIGNALS`)."""

    def signal(self, program_id: str, certaindex: float) -> None:
        """The program's certaindex moved (a probe, or a sample's answer)."""

    def program_done(self, program_id: str) -> None:
        """The program needs nothing more (it ended, or its policy stopped it)."""


class _NoSignals:
    def signal(self, program_id: str, certaindex: float) -> None:
        pass

    def program_done(self, program_id: str) -> None:
        pass


NO_SIGNALS: ProgramSignals = _NoSignals()


@dataclass(slots=True)
class FinishedSample:
    choice_index: int
    answer: str | None
    completion_tokens: int | None
    finish_reason: str | None


@dataclass(slots=True)
class ScoredSample:
    sample: FinishedSample
    sample_index: int
    answer_group: int
    certaindex: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where the policy stopped a program: its answer after `samples` samples were read."""

    answer: str | None
    samples: int
    reason: str


class Programs:
    """The answers of recent programs, in memory (oldest forgotten past `capacity`)."""

    def __init__(self, equivalence: AsyncEquivalence, metrics: Metrics, capacity: int = 10_000,
                 signals: ProgramSignals = NO_SIGNALS) -> None:
        self._equivalence = equivalence
        self._metrics = metrics
        self._signals = signals
        self._capacity = capacity
        self._answers: OrderedDict[str, list[str | None]] = OrderedDict()
        self._groups: dict[str, list[int]] = {}
        self._verdicts: dict[str, Verdict] = {}
        self._lock = asyncio.Lock()  # samples of one program finish concurrently

    async def add(self, program_id: str, samples: list[FinishedSample]) -> list[ScoredSample]:
        """Add finished samples in order; certaindex after each."""
        scored: list[ScoredSample] = []
        async with self._lock:
            answers = self._answers.pop(program_id, [])
            self._answers[program_id] = answers
            while len(self._answers) > self._capacity:
                gone, _ = self._answers.popitem(last=False)
                self._groups.pop(gone, None)
                self._verdicts.pop(gone, None)
            for sample in samples:
                answers.append(sample.answer)
                groups = self._groups[program_id] = await self._equivalence.group(answers)
                value = entropy_certaindex(group_sizes(groups))
                self._metrics.observe_certaindex("sc", value)
                self._signals.signal(program_id, value)
                scored.append(ScoredSample(sample, len(answers) - 1, groups[-1], value))
        return scored

    def verdict(self, program_id: str) -> Verdict | None:
        """The program's verdict, once its policy stopped it."""
        return self._verdicts.get(program_id)

    def decide(self, program_id: str, policy: ScPolicy) -> Verdict | None:
        """Put the program's answers so far to the policy; a stop becomes its verdict (once)."""
        if program_id in self._verdicts or program_id not in self._answers:
            return None
        answers = self._answers[program_id]
        decision = decide_sc(policy, answers, self._groups.get(program_id))
        if not decision.stop:
            return None
        verdict = self._verdicts[program_id] = Verdict(decision.answer, len(answers), decision.reason)
        self._signals.program_done(program_id)  # its later samples are answered by the verdict
        return verdict
