"""Schedulers for tests: importable by `dynasorctl serve --scheduler tests.schedulers:Lifo`
(the engine's environment has no pytest)."""

from __future__ import annotations

import json
import os

from proxy.scheduler.base import Fcfs, Job

JOB_LOG = "DYNASOR_TEST_JOB_LOG"  # where Lifo writes each job it is given, one JSON line each


class Lifo(Fcfs):
    """Newest first: an order the engine's own FCFS would never produce."""

    def submit(self, job: Job, now: float) -> None:
        super().submit(job, now)
        if path := os.environ.get(JOB_LOG):  # what the engine side told the scheduler
            with open(path, "a") as log:
                log.write(json.dumps({"request_id": job.request_id, "program": job.program_id,
                                      "kind": job.kind, "max_tokens": job.max_tokens}) + "\n")

    def admit(self, now: float, running: int, capacity: int) -> list[str]:
        free = max(0, capacity - running)
        out = list(reversed(self._queue))[:free]
        for request_id in out:
            del self._queue[request_id]
        return out
