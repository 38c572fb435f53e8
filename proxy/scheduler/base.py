"""The seam between `serve`'s engine and whoever decides the order of its work.

Pure: no I/O, no clock of its own (time is passed in), no asyncio. The same
scheduler drives the real in-process engine (`proxy.upstream.engine`), the
simulator (`dynasorctl bench serve --simulate`) and the unit tests.

The engine side owns the requests; the scheduler only ever sees `Job`s and
answers with request ids. vLLM 0.32 never lets a waiting request displace a
running one and cannot reorder a queued one, so the order is decided here, by
admission: the engine side submits a job, asks `admit` which jobs may start
whenever a slot frees up (or a job arrives), starts exactly those, in that
order, and reports back what happened to them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

JobKind = Literal["cot", "sample", "probe", "step", "other"]

# The program type a job without one belongs to: what its requests are like.
DEFAULT_TYPES: dict[JobKind, str] = {
    "cot": "cot", "sample": "sc", "probe": "probe", "step": "step", "other": "other",
}


@dataclass(slots=True)
class Job:
    """One engine request, as the scheduler sees it."""

    request_id: str
    program_id: str  # the program it belongs to (its own id for a lone request)
    kind: JobKind
    arrival: float  # seconds, on the caller's clock
    max_tokens: int | None = None  # the request's own budget, if it set one
    prompt_tokens: int | None = None
    # What kind of program it belongs to ("sc", "cot", "mcts", "rebase" or a client's own
    # label): the scheduler learns tokens per request and requests per program per type.
    program_type: str | None = None
    budget: int | None = None  # the most requests its program may make (n, max_samples, ...)

    @property
    def type(self) -> str:
        return self.program_type or DEFAULT_TYPES[self.kind]


class Scheduler(Protocol):
    """What the engine side calls. Every method is synchronous and cheap."""

    def submit(self, job: Job, now: float) -> None:
        """A request wants the engine."""

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        """The request ids to start now, in this order (at most `capacity - running`)."""

    def progress(self, request_id: str, tokens: int, now: float) -> None:
        """A running request has generated `tokens` tokens so far."""

    def finished(self, request_id: str, now: float) -> None:
        """A request ended (finished, stopped, aborted or failed); its slot is free."""

    def signal(self, program_id: str, certaindex: float, now: float) -> None:
        """A program's certaindex moved (a probe, a sample's answer, a step's rewards)."""

    def program_done(self, program_id: str, now: float) -> None:
        """A program needs nothing more: its queued requests are dropped by the caller."""

    def step_done(self, program_id: str, rewards: Sequence[float], now: float) -> None:
        """A multi-step program (tree search, rebase) finished a step.

        `rewards` are the reward model's scores in [0, 1] of what the step produced (MCTS:
        the rollouts that reached an answer; rebase: the step's candidates). The scheduler
        turns them into the program's reward certaindex (`proxy.core.certaindex`).
        """


class Fcfs:
    """First come, first served: the engine's own order, and the kill switch's fallback."""

    def __init__(self) -> None:
        self._queue: dict[str, None] = {}  # request ids in arrival order (an ordered set)

    def submit(self, job: Job, now: float) -> None:
        self._queue.setdefault(job.request_id)

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        out = list(itertools.islice(self._queue, max(0, capacity - running)))
        for request_id in out:
            del self._queue[request_id]
        return out

    def progress(self, request_id: str, tokens: int, now: float) -> None:
        pass

    def finished(self, request_id: str, now: float) -> None:
        self._queue.pop(request_id, None)  # ended before it was admitted (a client left)

    def signal(self, program_id: str, certaindex: float, now: float) -> None:
        pass

    def program_done(self, program_id: str, now: float) -> None:
        pass

    def step_done(self, program_id: str, rewards: Sequence[float], now: float) -> None:
        pass
