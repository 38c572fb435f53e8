"""Batched, off-path persistence of observations.

The request path only puts a record on a bounded queue (never blocking); one
background task drains it in batches and writes each batch in a worker thread.
When the store is unavailable or locked, batches are kept and retried with
backoff, the failure is counted and logged, and `/health` says so; records are
dropped (and counted) only when the queue bound is hit. Shutdown flushes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from proxy.metrics import Metrics
from proxy.store.models import ProbeRow, RequestRow, SampleRow

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    """Everything observed of one request: its row, its probes, its finished samples."""

    request: dict[str, Any]
    probes: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def write_records(engine: Engine, records: Sequence[Record]) -> None:
    """Write a batch in one transaction (blocking: call it from a worker thread)."""
    requests = [r.request for r in records]
    probes = [p for r in records for p in r.probes]
    samples = [s for r in records for s in r.samples]
    with engine.begin() as conn:
        conn.execute(insert(RequestRow), requests)
        if probes:
            conn.execute(insert(ProbeRow), probes)
        if samples:
            conn.execute(insert(SampleRow), samples)


class Recorder:
    def __init__(
        self,
        write: Callable[[Sequence[Record]], None],
        metrics: Metrics,
        queue_size: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.25,
    ) -> None:
        self._write = write
        self._metrics = metrics
        self._queue: asyncio.Queue[Record] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._task: asyncio.Task[None] | None = None
        self._retry: list[Record] = []
        self._closing = False
        self._deadline = 0.0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dynasor-recorder")

    def put(self, record: Record) -> None:
        """Hand a record over without waiting; counted as dropped if the queue is full."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._metrics.records_dropped += 1
            log.error("record queue full (%d): dropped request %s", self._queue.maxsize,
                      record.request.get("id"))

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._retry)

    @property
    def healthy(self) -> bool:
        return not self._retry

    async def _run(self) -> None:
        backoff = self._flush_interval_s
        while True:
            if self._retry:
                await asyncio.sleep(0 if self._closing else backoff)
                batch = self._retry
            else:
                try:
                    batch = [await asyncio.wait_for(self._queue.get(), self._flush_interval_s)]
                except TimeoutError:
                    # The timeout can cancel a get() that a put() had just woken: the
                    # record is still queued then, and shutdown must not leave it behind.
                    if self._closing and self._queue.empty():
                        return
                    continue
                if not self._closing and self._queue.qsize() < self._batch_size - 1:
                    # Let a batch gather: one write per flush interval, not one per
                    # request, keeps the writer thread off the event loop's back.
                    await asyncio.sleep(self._flush_interval_s)
            batch += self._drain(self._batch_size - len(batch))
            if await self._write_batch(batch):
                self._retry = []
                backoff = self._flush_interval_s
            else:
                self._retry = batch
                backoff = min(backoff * 2, 5.0)
                if self._closing and time.monotonic() > self._deadline:
                    lost = len(batch) + self._queue.qsize()
                    self._metrics.records_dropped += lost
                    log.error("shutdown: %d records could not be written", lost)
                    return

    def _drain(self, limit: int) -> list[Record]:
        out: list[Record] = []
        while len(out) < limit and not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def _write_batch(self, batch: list[Record]) -> bool:
        try:
            await asyncio.to_thread(self._write, batch)
        except (SQLAlchemyError, OSError) as exc:
            self._metrics.write_errors += 1
            self.last_error, self.last_error_at = str(exc).splitlines()[0], time.time()
            log.error("store write failed (%d records kept for retry): %s", len(batch),
                      self.last_error)
            return False
        self._metrics.records_written += len(batch)
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write everything still queued, retrying until `timeout_s`, then stop."""
        self._closing = True
        self._deadline = time.monotonic() + timeout_s
        if self._task is not None:
            await self._task
