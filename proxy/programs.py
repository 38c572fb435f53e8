"""Self-consistency programs: samples of one problem, and their answer-entropy certaindex.

A program is either one request with `n > 1` or several requests that share
an `X-Dynasor-Program` header. After each finished sample, its answer joins the
program's answers, equivalent answers are grouped (math-aware, off the event
loop) and certaindex = 1 - H/log(n) is recorded.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from proxy.certaindex import entropy_certaindex, group_sizes
from proxy.equivalence import AsyncEquivalence
from proxy.metrics import Metrics

PROGRAM_HEADER = b"x-dynasor-program"


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


class Programs:
    """The answers of recent programs, in memory (oldest forgotten past `capacity`)."""

    def __init__(self, equivalence: AsyncEquivalence, metrics: Metrics, capacity: int = 10_000) -> None:
        self._equivalence = equivalence
        self._metrics = metrics
        self._capacity = capacity
        self._answers: OrderedDict[str, list[str | None]] = OrderedDict()
        self._lock = asyncio.Lock()  # samples of one program finish concurrently

    async def add(self, program_id: str, samples: list[FinishedSample]) -> list[ScoredSample]:
        """Add finished samples in order; certaindex after each."""
        scored: list[ScoredSample] = []
        async with self._lock:
            answers = self._answers.pop(program_id, [])
            self._answers[program_id] = answers
            while len(self._answers) > self._capacity:
                self._answers.popitem(last=False)
            for sample in samples:
                answers.append(sample.answer)
                groups = await self._equivalence.group(answers)
                value = entropy_certaindex(group_sizes(groups))
                self._metrics.observe_certaindex("sc", value)
                scored.append(ScoredSample(sample, len(answers) - 1, groups[-1], value))
        return scored
