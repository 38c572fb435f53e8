"""Admission control: the scheduler's order is the order requests enter the engine."""

from __future__ import annotations

import asyncio

import pytest

from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Fcfs, Job


class Lifo(Fcfs):
    """Newest first: an order the engine's own FCFS would never produce."""

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        free = max(0, capacity - running)
        return [self._queue.pop() for _ in range(min(free, len(self._queue)))]


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
