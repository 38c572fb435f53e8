"""Schedulers for tests: importable by `dynasorctl serve --scheduler tests.schedulers:Lifo`
(the engine's environment has no pytest)."""

from __future__ import annotations

from proxy.scheduler.base import Fcfs


class Lifo(Fcfs):
    """Newest first: an order the engine's own FCFS would never produce."""

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        free = max(0, capacity - running)
        return [self._queue.pop() for _ in range(min(free, len(self._queue)))]
