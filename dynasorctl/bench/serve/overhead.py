"""What the program scheduler costs at a deep queue: seconds per admitted request.

A scheduler-only run (no engine): `capacity` requests run; each engine step reports one
more token for every running request (as the real engine does); a request ends at its
length, and its program may go on (self-consistency waves) or end; new programs arrive
so that `queued` programs are always waiting. Every scheduler call is timed in this
process's CPU time: on a shared machine the wall clock mostly measures waiting for a core
(at a load of 10 on 2 cores it read 2,900 us per request where the CPU time was 260 us).
Reading that clock costs a little more than the wall clock's, so the figure errs high.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from dynasorctl.bench.serve.arms import Timed
from proxy.scheduler.base import Job
from proxy.scheduler.program import ProgramScheduler


@dataclass(frozen=True, slots=True)
class Overhead:
    queued_programs: int  # waiting throughout
    capacity: int
    admitted: int
    calls: int  # scheduler calls, progress reports included
    us_per_request: float  # all scheduler time / admitted requests
    admit_us_per_request: float  # `admit` alone


def measure(queued: int = 1000, capacity: int = 64, admitted: int = 3000, seed: int = 0,
            tick: Callable[[], None] = lambda: None) -> Overhead:
    rng = random.Random(seed)
    inner = ProgramScheduler()
    scheduler = Timed(inner, time.process_time)
    admit_seconds = 0.0
    calls = 0
    now = 0.0
    count = 0
    jobs: dict[str, tuple[Job, int]] = {}  # request id -> (job, its length)
    running: dict[str, int] = {}  # request id -> tokens so far
    waves: dict[str, int] = {}  # program id -> waves left

    def submit(program_id: str, kind: str, n: int) -> None:
        nonlocal calls
        for i in range(n):
            request_id = f"{program_id}/{waves[program_id]}/{i}"
            job = Job(request_id, program_id, "sample" if kind == "sc" else "cot", now,
                      program_type=kind, budget=8 if kind == "sc" else 1)
            jobs[request_id] = (job, rng.randint(50, 500))
            scheduler.submit(job, now)
            calls += 1

    def arrive() -> None:
        nonlocal count
        program_id = f"p{count}"
        count += 1
        kind = rng.choice(("sc", "cot"))
        waves[program_id] = rng.randint(1, 4) if kind == "sc" else 1
        submit(program_id, kind, 2 if kind == "sc" else 1)

    while scheduler.admitted < admitted:
        while inner.queued_programs < queued:
            arrive()
        before = scheduler.seconds
        for request_id in scheduler.admit(now, len(running), capacity):
            running[request_id] = 0
            tick()
        admit_seconds += scheduler.seconds - before
        calls += 1
        now += 0.05  # one engine step
        for request_id in list(running):
            running[request_id] += 1
            scheduler.progress(request_id, running[request_id], now)
            calls += 1
            job, length = jobs[request_id]
            if running[request_id] < length:
                continue
            del running[request_id]
            scheduler.finished(request_id, now)
            scheduler.signal(job.program_id, rng.random(), now)
            calls += 2
            waves[job.program_id] -= 1
            if waves[job.program_id] > 0:
                submit(job.program_id, job.type, 1)
            else:
                scheduler.program_done(job.program_id, now)
                calls += 1
    n = scheduler.admitted
    return Overhead(queued, capacity, n, calls, 1e6 * scheduler.seconds / n,
                    1e6 * admit_seconds / n)
