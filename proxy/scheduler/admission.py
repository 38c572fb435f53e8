"""Admission control: requests wait here until the scheduler lets them into the engine.

The asyncio shell around a pure `Scheduler`: each engine request holds a slot
for as long as it runs. A request that wants the engine awaits `slot(job)`;
whenever a slot frees up or a job arrives, the scheduler is asked which jobs
start now, and exactly those are released, in its order. With at most
`capacity` requests in the engine, the engine's own queue stays empty, so
dynasor's order is the engine's order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from proxy.scheduler.base import Job, Scheduler


class Admission:
    def __init__(self, scheduler: Scheduler, capacity: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.scheduler = scheduler
        self.capacity = capacity
        self._clock = clock
        self._waiting: dict[str, tuple[Job, asyncio.Future[None]]] = {}
        self.running = 0

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self, job: Job) -> AsyncIterator[None]:
        """Wait until the scheduler admits `job`, hold its slot, free it on exit.

        A caller cancelled while waiting leaves the queue; one cancelled while
        running frees its slot. Either way the scheduler hears `finished`.
        """
        now = self._clock()
        admitted = asyncio.get_running_loop().create_future()
        self._waiting[job.request_id] = job, admitted
        self.scheduler.submit(job, now)
        self._pump()
        try:
            await admitted
        except BaseException:
            if self._waiting.pop(job.request_id, None) is None and admitted.done():
                self.running -= 1  # admitted in the same tick as the cancellation
            self.scheduler.finished(job.request_id, self._clock())
            self._pump()
            raise
        try:
            yield
        finally:
            self.running -= 1
            self.scheduler.finished(job.request_id, self._clock())
            self._pump()

    def progress(self, request_id: str, tokens: int) -> None:
        self.scheduler.progress(request_id, tokens, self._clock())

    def signal(self, program_id: str, certaindex: float) -> None:
        self.scheduler.signal(program_id, certaindex, self._clock())
        self._pump()

    def program_done(self, program_id: str) -> None:
        now = self._clock()
        self.scheduler.program_done(program_id, now)
        # The scheduler drops the program's queued requests, and whoever sent them ends them
        # (a stopped program's samples are cancelled). One still waiting here (a tagged
        # program's request sent before the verdict) must not wait forever: it goes back in.
        for job, _ in [w for w in self._waiting.values() if w[0].program_id == program_id]:
            self.scheduler.submit(job, now)
        self._pump()

    def step_done(self, program_id: str, rewards: Sequence[float]) -> None:
        self.scheduler.step_done(program_id, rewards, self._clock())
        self._pump()

    def replace(self, scheduler: Scheduler) -> None:
        """Hand the queue to another scheduler (the kill switch: back to FCFS) without a stop.

        The queued jobs go over as they came, in their order of arrival; the running ones
        end as usual (a scheduler hears `finished` of a request it never saw, and ignores it)."""
        now = self._clock()
        for job, _ in self._waiting.values():
            scheduler.submit(job, now)
        self.scheduler = scheduler
        self._pump()

    def _pump(self) -> None:
        if not self._waiting or self.running >= self.capacity:
            return
        for request_id in self.scheduler.admit(self._clock(), self.running, self.capacity):
            _, future = self._waiting.pop(request_id, (None, None))
            if future is None or future.done():
                continue  # unknown to us, or its waiter already left
            future.set_result(None)
            self.running += 1
            if self.running >= self.capacity:
                break
