"""Admission control: the scheduler's order is the order requests enter the engine."""

from __future__ import annotations

import asyncio

import pytest

from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Fcfs, Job
from proxy.scheduler.program import ProgramScheduler


class Lifo(Fcfs):
    """Newest first: an order the engine's own FCFS would never produce."""

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        out = list(reversed(self._queue))[:max(0, capacity - running)]
        for request_id in out:
            del self._queue[request_id]
        return out


def job(i: int) -> Job:
    return Job(f"r{i}", f"p{i}", "cot", 0.0)


async def test_requests_start_in_the_schedulers_order_never_above_capacity():
    admission = Admission(Lifo(), capacity=1)
    started: list[str] = []
    gate = asyncio.Event()

    async def request(i: int) -> None:
        async with admission.slot(job(i)):
            started.append(f"r{i}")
            assert admission.running <= 1
            await gate.wait()

    first = asyncio.create_task(request(0))
    while not started:
        await asyncio.sleep(0)
    rest = [asyncio.create_task(request(i)) for i in (1, 2, 3)]
    while admission.queued < 3:
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *rest)
    assert started == ["r0", "r3", "r2", "r1"]
    assert admission.running == 0 and admission.queued == 0


async def test_a_request_cancelled_while_queued_leaves_the_queue_and_frees_nothing():
    admission = Admission(Fcfs(), capacity=1)
    hold = asyncio.Event()

    async def request(i: int) -> None:
        async with admission.slot(job(i)):
            await hold.wait()

    running = asyncio.create_task(request(0))
    queued = asyncio.create_task(request(1))
    while admission.queued < 1:
        await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert admission.queued == 0 and admission.running == 1
    hold.set()
    await running
    assert admission.running == 0


async def test_a_running_request_cancelled_frees_its_slot_for_the_next():
    admission = Admission(Fcfs(), capacity=1)
    order: list[int] = []

    async def request(i: int) -> None:
        async with admission.slot(job(i)):
            order.append(i)
            await asyncio.Event().wait()

    first = asyncio.create_task(request(0))
    second = asyncio.create_task(request(1))
    while order != [0]:
        await asyncio.sleep(0)
    first.cancel()
    while order != [0, 1]:
        await asyncio.sleep(0)
    assert admission.running == 1
    second.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert admission.running == 0


async def test_replace_hands_the_queue_over_in_arrival_order():
    admission = Admission(Lifo(), capacity=1)
    order: list[int] = []
    gate = asyncio.Event()

    async def request(i: int) -> None:
        async with admission.slot(job(i)):
            order.append(i)
            await gate.wait()

    tasks = [asyncio.create_task(request(0))]
    while order != [0]:
        await asyncio.sleep(0)
    tasks += [asyncio.create_task(request(i)) for i in (1, 2, 3)]
    while admission.queued < 3:
        await asyncio.sleep(0)
    admission.replace(Fcfs())  # the kill switch: first come, first served from here on
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


def test_capacity_below_one_is_refused():
    with pytest.raises(ValueError):
        Admission(Fcfs(), capacity=0)


class Kept(Fcfs):
    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[Job] = []

    def submit(self, job: Job, now: float) -> None:
        self.jobs.append(job)
        super().submit(job, now)


async def _hold_one(admission: Admission, first: Job, hold: asyncio.Event, then: list[Job]) -> list[asyncio.Task]:
    async def request(j: Job) -> None:
        async with admission.slot(j):
            await hold.wait()

    tasks = [asyncio.create_task(request(first))]
    while admission.running < 1:
        await asyncio.sleep(0)
    tasks += [asyncio.create_task(request(j)) for j in then]
    while admission.queued < len(then):
        await asyncio.sleep(0)
    return tasks


async def test_the_kill_switch_hands_over_the_queued_jobs_as_they_came():
    admission = Admission(Lifo(), capacity=1)
    hold = asyncio.Event()
    waiting = [Job("s1", "prog", "sample", 1.0, 16, 5, "mcts", 4), Job("c2", "c2", "cot", 2.0)]
    tasks = await _hold_one(admission, job(0), hold, waiting)
    fcfs = Kept()
    admission.replace(fcfs)
    assert fcfs.jobs == waiting  # program, kind, type and budget kept, in arrival order
    hold.set()
    await asyncio.gather(*tasks)
    assert admission.running == 0 and admission.queued == 0


async def test_a_request_still_waiting_when_its_program_is_done_is_not_left_waiting():
    """The program scheduler drops a done program's queue; whoever sent a request normally
    ends it, but one still waiting must still be served, not wait forever."""
    admission = Admission(ProgramScheduler(), capacity=1)
    hold = asyncio.Event()
    tasks = await _hold_one(admission, job(0), hold, [Job("t1", "tagged", "sample", 1.0)])
    admission.program_done("tagged")
    assert admission.queued == 1
    hold.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert admission.running == 0 and admission.queued == 0


def test_fcfs_takes_a_request_once_and_forgets_one_that_left():
    fcfs = Fcfs()
    for j in (job(1), job(2), job(1), job(3)):
        fcfs.submit(j, 0.0)
    fcfs.finished("r2", 0.0)
    assert fcfs.admit(0.0, 0, 2) == ["r1", "r3"] and fcfs.admit(0.0, 0, 2) == []
