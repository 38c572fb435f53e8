"""dynasor's program scheduler (Fu et al., 2024, §3.3 and Appendix D). Pure.

It orders *programs* (the samples of a self-consistency question, one chain of thought,
the steps of a tree search), not anonymous requests. `admit` decides, in this order:

1. **Probes first.** A probe is a short request whose answer may stop its program and
   free that program's slots, so probes never wait behind work (first come, first served
   among themselves).
2. **Starvation guard** (finish-time fairness): a program that has been in the system
   longer than `fairness` times its predicted time alone is escalated; escalated programs
   go before all others, in the order they crossed that line.
3. **Approximate shortest job first**: otherwise the program with the least predicted
   remaining work goes first. Work = its queued requests and the requests it is still
   expected to make (learned per program type, given how many it has made), times the
   type's learned tokens per request, plus what its running requests still have to
   generate; all but the queued requests shrink by (1 - certaindex), since a program that
   has converged is near its end (the enforced policy's stop ends it: `program_done`).
4. **Gang scheduling**: the chosen program's queued requests are admitted together (as
   many as there are free slots) before the next program's, so a program's steps stay
   together instead of interleaving with every other program's.

`Config` switches each part off for the ablations; `PROGRAM_FIFO` is a plain program-level
gang scheduler in arrival order (Parrot-like). Heaps with lazy invalidation keep `admit`
at O(log programs) per admitted request.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.core.certaindex import REWARD_AGGREGATES, reward_certaindex
from proxy.scheduler.base import Job
from proxy.scheduler.predict import WorkModel


@dataclass(frozen=True, slots=True)
class Config:
    gang: bool = True  # admit a program's queued requests together
    sjf: bool = True  # least predicted remaining work first (else: program arrival order)
    fairness: float | None = 3.0  # escalate past this many times the time alone; None: off
    use_certaindex: bool = True  # shrink predicted work by the program's certaindex
    probes_first: bool = True  # probes before any other work
    idle_ttl: float = 60.0  # seconds a program with nothing queued or running is remembered


DYNASOR = Config()
PACE_EVERY = 8  # tokens between two samples of a stream's pace
PROGRAM_FIFO = Config(sjf=False, fairness=None, use_certaindex=False, probes_first=False)


@dataclass(slots=True, eq=False)
class _Program:
    program_id: str
    type: str
    arrival: float
    budget: int | None
    max_tokens: int | None
    queued: dict[str, Job] = field(default_factory=dict)  # in submission order
    running: dict[str, list[float]] = field(default_factory=dict)  # [tokens, paced at, when]
    made: int = 0  # requests submitted, probes aside
    width: int = 1  # most requests queued or running at once
    certaindex: float | None = None
    rewards: list[float] = field(default_factory=list)
    done: bool = False
    version: int = 0


Unit = tuple[_Program, str | None]  # a program (gang) or one of its requests


class ProgramScheduler:
    """The scheduler `serve` runs by default (see the module docstring)."""

    def __init__(self, config: Config = DYNASOR, model: WorkModel | None = None) -> None:
        self.config = config
        self.model = model or WorkModel()
        self._programs: dict[str, _Program] = {}
        self._owner: dict[str, _Program] = {}  # request id -> its program
        self._probes: dict[str, Job] = {}  # queued probes, in arrival order (probes_first)
        self._running_probes: set[str] = set()
        self._order: list[tuple[float, float, int, int, Unit]] = []  # (work, arrival, seq, ver)
        self._fair: list[tuple[float, int, int, Unit]] = []  # (escalate at, seq, version)
        self._dirty: dict[str, _Program] = {}
        self._idle: dict[str, float] = {}  # program id -> idle since, oldest first
        self._waiting: set[str] = set()  # programs with queued requests
        self._seq = itertools.count()

    @property
    def queued_programs(self) -> int:
        return len(self._waiting)

    # --- what the engine side reports ---------------------------------------------------

    def submit(self, job: Job, now: float) -> None:
        if job.request_id in self._owner or job.request_id in self._probes:
            return
        if job.kind == "probe" and self.config.probes_first:
            self._probes[job.request_id] = job
            return
        p = self._programs.get(job.program_id)
        if p is None:
            p = self._programs[job.program_id] = _Program(
                job.program_id, job.type, job.arrival, job.budget, job.max_tokens)
        p.done = False
        self._idle.pop(p.program_id, None)
        p.budget = max(p.budget or 0, job.budget or 0) or None
        p.queued[job.request_id] = job
        self._waiting.add(p.program_id)
        if job.kind != "probe":
            p.made += 1
        p.width = max(p.width, len(p.queued) + len(p.running))
        self._owner[job.request_id] = p
        self._dirty[p.program_id] = p

    def progress(self, request_id: str, tokens: int, now: float) -> None:
        p = self._owner.get(request_id)
        state = p.running.get(request_id) if p is not None else None
        if state is None:
            return
        state[0] = tokens
        if tokens - state[1] >= PACE_EVERY and now > state[2]:  # a pace sample now and then
            self.model.learn_pace((now - state[2]) / (tokens - state[1]))
            state[1], state[2] = tokens, now
        if p.queued:
            self._dirty[p.program_id] = p

    def finished(self, request_id: str, now: float) -> None:
        if self._probes.pop(request_id, None) is not None:
            return
        probe = request_id in self._running_probes
        self._running_probes.discard(request_id)
        p = self._owner.pop(request_id, None)
        if p is None:
            return
        if p.queued.pop(request_id, None) is None and request_id in p.running:
            tokens = p.running.pop(request_id)[0]
            if not probe:
                self.model.learn_request(p.type, round(tokens))
        self._settle(p, now)

    def signal(self, program_id: str, certaindex: float, now: float) -> None:
        p = self._programs.get(program_id)
        if p is not None:
            p.certaindex = min(1.0, max(0.0, certaindex))
            self._dirty[program_id] = p

    def step_done(self, program_id: str, rewards: Sequence[float], now: float) -> None:
        p = self._programs.get(program_id)
        if p is not None:
            p.rewards.extend(rewards)
            self.signal(program_id, reward_certaindex(
                p.rewards, REWARD_AGGREGATES.get(p.type, "mean")), now)

    def program_done(self, program_id: str, now: float) -> None:
        for request_id in [r for r, job in self._probes.items() if job.program_id == program_id]:
            del self._probes[request_id]
        p = self._programs.get(program_id)
        if p is None or p.done:
            return
        p.done = True
        self.model.learn_program(p.type, p.made)
        for request_id in p.queued:
            self._owner.pop(request_id, None)
        p.queued.clear()
        self._waiting.discard(program_id)
        self._settle(p, now)

    # --- the decision -------------------------------------------------------------------

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        free = capacity - running
        self._sweep(now)
        out: list[str] = []
        while free > 0 and self._probes:
            request_id = next(iter(self._probes))
            del self._probes[request_id]
            self._running_probes.add(request_id)
            out.append(request_id)
            free -= 1
        self._refresh(now)
        while free > 0:
            unit = self._next(now)
            if unit is None:
                break
            p, only = unit
            for request_id in [only] if only is not None else list(p.queued):
                if free == 0:
                    break
                job = p.queued.pop(request_id)
                p.running[request_id] = [0, 0, now]  # the pace is measured from admission
                if job.kind == "probe":
                    self._running_probes.add(request_id)
                out.append(request_id)
                free -= 1
            if not p.queued:
                self._waiting.discard(p.program_id)
            self._dirty[p.program_id] = p
            self._refresh(now)
        return out

    def _next(self, now: float) -> Unit | None:
        while self._fair and self._fair[0][0] <= now:
            *_, version, unit = heapq.heappop(self._fair)
            if self._valid(unit, version):
                return unit
        while self._order:
            *_, version, unit = heapq.heappop(self._order)
            if self._valid(unit, version):
                return unit
        return None

    @staticmethod
    def _valid(unit: Unit, version: int) -> bool:
        p, only = unit
        return version == p.version and (only in p.queued if only is not None else bool(p.queued))

    def _refresh(self, now: float) -> None:
        """Re-key the programs whose state changed since the last decision."""
        for p in self._dirty.values():
            p.version += 1
            if not p.queued or p.done:
                continue
            work, alone = self._work(p)
            escalate_at = p.arrival + self.config.fairness * alone if (
                self.config.fairness is not None and alone is not None) else math.inf
            units: list[tuple[Unit, float, float]]
            if self.config.gang:
                units = [((p, None), work if self.config.sjf else 0.0, p.arrival)]
            else:
                per_request = self.model.tokens(p.type, p.max_tokens) if self.config.sjf else 0.0
                units = [((p, r), per_request, job.arrival) for r, job in p.queued.items()]
            for unit, key, arrival in units:
                seq = next(self._seq)
                heapq.heappush(self._order, (key, arrival, seq, p.version, unit))
                if escalate_at < math.inf:
                    heapq.heappush(self._fair, (escalate_at, seq, p.version, unit))
        self._dirty.clear()
        if len(self._order) > 64 and len(self._order) > 4 * len(self._owner):
            self._rebuild()

    def _work(self, p: _Program) -> tuple[float, float | None]:
        """Predicted remaining work (tokens) and predicted time alone (seconds, if known)."""
        tokens = self.model.tokens(p.type, p.max_tokens)
        shrink = 1.0 - (p.certaindex or 0.0) if self.config.use_certaindex else 1.0
        left = self.model.requests_left(p.type, p.made, p.budget)
        running = sum(max(tokens - state[0], 0.0) for state in p.running.values())
        work = len(p.queued) * tokens + (running + left * tokens) * shrink
        pace = self.model.seconds_per_token
        alone = None if pace is None else math.ceil((p.made + left) / p.width) * tokens * pace
        return work, alone

    def _rebuild(self) -> None:
        self._order = [e for e in self._order if self._valid(e[4], e[3])]
        self._fair = [e for e in self._fair if self._valid(e[3], e[2])]
        heapq.heapify(self._order)
        heapq.heapify(self._fair)

    # --- bookkeeping --------------------------------------------------------------------

    def _settle(self, p: _Program, now: float) -> None:
        if not p.queued:
            self._waiting.discard(p.program_id)
        if p.queued or p.running:
            self._dirty[p.program_id] = p
        elif p.done:
            self._forget(p)
        else:  # between steps: its next request may come
            self._idle.pop(p.program_id, None)
            self._idle[p.program_id] = now

    def _sweep(self, now: float) -> None:
        while self._idle:
            program_id, since = next(iter(self._idle.items()))
            if now - since < self.config.idle_ttl:
                break
            p = self._programs[program_id]
            self.model.learn_program(p.type, p.made)
            self._forget(p)

    def _forget(self, p: _Program) -> None:
        self._idle.pop(p.program_id, None)
        self._dirty.pop(p.program_id, None)
        if self._programs.get(p.program_id) is p:
            del self._programs[p.program_id]
        p.version += 1
