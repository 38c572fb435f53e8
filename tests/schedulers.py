"""Schedulers for tests: importable by `dynasorctl serve --scheduler tests.schedulers:Logged`
(the engine's environment has no pytest)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from proxy.scheduler.base import Fcfs, Job
from proxy.scheduler.program import ProgramScheduler

JOB_LOG = "DYNASOR_TEST_JOB_LOG"  # where a scheduler here writes what it is told, one JSON line each


def _log(entry: dict[str, Any]) -> None:
    if path := os.environ.get(JOB_LOG):
        with open(path, "a") as log:
            log.write(json.dumps(entry) + "\n")


def _job(job: Job) -> dict[str, Any]:
    return {"request_id": job.request_id, "program": job.program_id, "kind": job.kind,
            "max_tokens": job.max_tokens, "type": job.type, "budget": job.budget}


class Logged(ProgramScheduler):
    """dynasor's scheduler, as `serve` runs it by default, writing down what reaches it: every
    job, certaindex signal, step and program done (`JOB_LOG`)."""

    def submit(self, job: Job, now: float) -> None:
        _log(_job(job))
        super().submit(job, now)

    def signal(self, program_id: str, certaindex: float, now: float) -> None:
        _log({"event": "signal", "program": program_id, "certaindex": certaindex})
        super().signal(program_id, certaindex, now)

    def step_done(self, program_id: str, rewards: Sequence[float], now: float) -> None:
        _log({"event": "step", "program": program_id, "rewards": list(rewards)})
        super().step_done(program_id, rewards, now)

    def program_done(self, program_id: str, now: float) -> None:
        _log({"event": "done", "program": program_id})
        super().program_done(program_id, now)


class Lifo(Fcfs):
    """Newest first: an order the engine's own FCFS would never produce."""

    def submit(self, job: Job, now: float) -> None:
        super().submit(job, now)
        _log(_job(job))

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        free = max(0, capacity - running)
        out = list(reversed(self._queue))[:free]
        for request_id in out:
            del self._queue[request_id]
        return out
