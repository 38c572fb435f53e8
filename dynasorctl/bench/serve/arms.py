"""The arms `bench serve` compares, and what one arm's run of one arrival trace came to."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from proxy.scheduler.base import Fcfs, Job, Scheduler
from proxy.scheduler.program import DYNASOR, PROGRAM_FIFO, Config, ProgramScheduler


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    stopping: bool  # programs stop where the policy says (else they run to the end)
    config: Config | None  # the program scheduler's settings; None: FCFS
    what: str

    def scheduler(self) -> Scheduler:
        return Fcfs() if self.config is None else ProgramScheduler(self.config)


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("fcfs", False, None, "first come, first served, no stopping (the plain engine)"),
    Arm("fcfs-stop", True, None, "FCFS with certaindex stopping only"),
    Arm("gang-stop", True, PROGRAM_FIFO, "program-FIFO gang scheduling (Parrot-like), stopping"),
    Arm("dynasor", True, DYNASOR, "gang + SJF + fairness + certaindex + probes first, stopping"),
    # The paper's ablations: dynasor less one part.
    Arm("dynasor-no-stop", False, DYNASOR, "dynasor's scheduling, no certaindex stopping"),
    Arm("dynasor-no-gang", True, replace(DYNASOR, gang=False), "dynasor, requests one by one"),
    Arm("dynasor-no-sjf", True, replace(DYNASOR, sjf=False), "dynasor, program arrival order"),
    Arm("dynasor-no-fairness", True, replace(DYNASOR, fairness=None),
        "dynasor without the starvation guard"),
    Arm("dynasor-no-certaindex", True, replace(DYNASOR, use_certaindex=False),
        "dynasor's SJF without certaindex refining it"),
    Arm("dynasor-no-probe-priority", True, replace(DYNASOR, probes_first=False),
        "dynasor, probes queued with their program"),
)}
MAIN_ARMS = ("fcfs", "fcfs-stop", "gang-stop", "dynasor")
ABLATIONS = tuple(n for n in ARMS if n not in MAIN_ARMS)


@dataclass(slots=True)
class Outcome:
    """What happened to one program."""

    program_id: str
    type: str
    difficulty: int
    arrival: float
    finish: float | None  # None: not done by the end of the run
    tokens: int  # generated, probes included
    probe_tokens: int
    stopped: bool
    correct: bool

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival


@dataclass(slots=True)
class CellResult:
    """One arm on one arrival trace (a rate and a seed)."""

    outcomes: list[Outcome]
    scheduler_seconds: float  # spent inside the scheduler's methods
    admitted: int  # requests it admitted
    peak_queued_programs: int


class Timed:
    """A scheduler wrapper that adds up the time spent in its methods."""

    def __init__(self, inner: Scheduler, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.admitted = 0
        self.peak_queued = 0
        self._clock = clock

    def _time(self, started: float) -> None:
        self.seconds += self._clock() - started

    def submit(self, job: Job, now: float) -> None:
        t = self._clock()
        self.inner.submit(job, now)
        self._time(t)

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        t = self._clock()
        out = self.inner.admit(now, running, capacity)
        self._time(t)
        self.admitted += len(out)
        queued = getattr(self.inner, "queued_programs", None)
        if queued is not None:
            self.peak_queued = max(self.peak_queued, queued)
        return out

    def progress(self, request_id: str, tokens: int, now: float) -> None:
        t = self._clock()
        self.inner.progress(request_id, tokens, now)
        self._time(t)

    def finished(self, request_id: str, now: float) -> None:
        t = self._clock()
        self.inner.finished(request_id, now)
        self._time(t)

    def signal(self, program_id: str, certaindex: float, now: float) -> None:
        t = self._clock()
        self.inner.signal(program_id, certaindex, now)
        self._time(t)

    def program_done(self, program_id: str, now: float) -> None:
        t = self._clock()
        self.inner.program_done(program_id, now)
        self._time(t)

    def step_done(self, program_id: str, rewards: Sequence[float], now: float) -> None:
        t = self._clock()
        self.inner.step_done(program_id, rewards, now)
        self._time(t)
