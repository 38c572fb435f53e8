"""Batched, off-path persistence of observations.

The request path only puts a record on a bounded queue (never blocking); one
background task drains it in batches and writes each batch in a worker thread.
When the store is unavailable or locked, batches are kept and retried with
backoff, the failure is counted and logged, and `/health` says so; records are
dropped (and counted) only when the queue bound is hit. Shutdown flushes.

No record can stop the others: every value is first made to fit its column
(`proxy.store.storable`), and a batch the store still refuses for what it holds
(not for being unreachable) is split until the refused record stands alone,
which is dropped, counted and logged once. Should the writer task die all the
same, it is restarted with the batch it held, and `/health` says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from proxy.metrics import Metrics
from proxy.store.models import ProbeRow, RequestRow, SampleRow
from proxy.store.storable import Storable

# The store, not the record: locked, down, out of connections or disk. Retried as a whole.
# (Other driver errors are the store only when the connection went, as SQLAlchemy marks them.)
UNAVAILABLE = (OperationalError, DisconnectionError, PoolTimeoutError, OSError)


def _unavailable(exc: Exception) -> bool:
    return isinstance(exc, UNAVAILABLE) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    """Everything observed of one request: its row, its probes, its finished samples."""

    request: dict[str, Any]
    probes: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    fitted: bool = False  # its values made storable (once: a retried record is not counted twice)


_FIT = {"request": Storable(RequestRow.__table__), "probes": Storable(ProbeRow.__table__),
        "samples": Storable(SampleRow.__table__)}


def fit_record(record: Record) -> list[str]:
    """Make every value of `record` fit its column, in place; the fields changed (once)."""
    if record.fitted:
        return []
    record.fitted = True
    changed = _FIT["request"].fit(record.request)
    for name in ("probes", "samples"):
        for row in getattr(record, name):
            changed += [f"{name}.{f}" for f in _FIT[name].fit(row)]
    return changed


def _insert_new_requests(conn: Connection, requests: list[dict[str, Any]]) -> set[str]:
    """Insert the requests not in the store yet; the ids inserted.

    A batch whose commit was cut off (a PostgreSQL server gone mid-commit) may have landed
    after all; written again on retry, its requests are skipped rather than refused, so
    a record lands once and the batch is not stuck on its own duplicate.
    """
    dialect = {"postgresql": postgresql, "sqlite": sqlite}.get(conn.dialect.name)
    if dialect is None:  # another back end: plain inserts (a duplicate fails the batch)
        conn.execute(insert(RequestRow), requests)
        return {r["id"] for r in requests}
    if dialect is postgresql:
        # Plain inserts first, in a savepoint: about twice as fast as ON CONFLICT ... RETURNING
        # over the network, and a duplicate is rare (only a retried batch has one).
        try:
            with conn.begin_nested():
                conn.execute(insert(RequestRow), requests)
            return {r["id"] for r in requests}
        except IntegrityError:
            pass
    stmt = (dialect.insert(RequestRow).on_conflict_do_nothing(index_elements=["id"])
            .returning(RequestRow.id))
    return set(conn.execute(stmt, requests).scalars())


def write_records(engine: Engine, records: Sequence[Record]) -> None:
    """Write a batch in one transaction (blocking: call it from a worker thread)."""
    requests = [r.request for r in records]
    with engine.begin() as conn:
        new = _insert_new_requests(conn, requests)
        probes = [p for r in records if r.request["id"] in new for p in r.probes]
        samples = [s for r in records if r.request["id"] in new for s in r.samples]
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
        self.flush_interval_s = flush_interval_s
        self._task: asyncio.Task[None] | None = None
        self._retry: list[Record] = []
        self._held: list[Record] = []  # the batch being written, kept should the writer die
        self._failing = False
        self._closing = False
        self._deadline = 0.0
        self._logged_fields: set[str] = set()
        self._restart: asyncio.TimerHandle | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dynasor-recorder")
        self._task.add_done_callback(self._ended)

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
        return self._queue.qsize() + len(self._retry) + len(self._held)

    @property
    def healthy(self) -> bool:
        """False from a failed write (the store unavailable) until a write succeeds."""
        return not self._failing

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The writer task ended: expected once closing has flushed; otherwise restart it."""
        if task is not self._task or task.cancelled():  # cancelled: on purpose, by its owner
            return
        exc = task.exception()
        if exc is None and self._closing:
            return
        self._metrics.writer_restarts += 1
        self.last_error, self.last_error_at = f"writer stopped: {exc!r}", time.time()
        log.error("the store writer stopped (%r); restarting it with the %d records it held",
                  exc, len(self._held), exc_info=exc)
        self._retry, self._held = self._held + self._retry, []
        if not self._closing:  # a writer that keeps dying must not spin
            delay = min(0.1 * self._metrics.writer_restarts, 5.0)
            self._restart = asyncio.get_running_loop().call_later(delay, self._restarted)
        elif time.monotonic() < self._deadline:
            self.start()
        else:
            self._lose("shutdown: the store writer stopped;")

    def _restarted(self) -> None:
        self._restart = None
        self.start()

    async def _run(self) -> None:
        backoff = self.flush_interval_s
        while True:
            # Whatever leaves the queue is held until written, so a writer that dies loses none.
            if self._retry:  # closing, retry sooner, but never in a tight loop
                await asyncio.sleep(min(backoff, 0.5) if self._closing else backoff)
                self._held, self._retry = self._retry, []
            else:
                try:
                    self._held = [await asyncio.wait_for(self._queue.get(), self.flush_interval_s)]
                except TimeoutError:
                    # The timeout can cancel a get() that a put() had just woken: the
                    # record is still queued then, and shutdown must not leave it behind.
                    if self._closing and self._queue.empty():
                        return
                    continue
                if not self._closing and self._queue.qsize() < self._batch_size - 1:
                    # Let a batch gather: one write per flush interval, not one per
                    # request, keeps the writer thread off the event loop's back.
                    await asyncio.sleep(self.flush_interval_s)
            self._drain(self._held, self._batch_size)
            kept = await self._write_batch(self._held)
            self._retry, self._held = kept, []
            if not kept:
                backoff = self.flush_interval_s
                continue
            backoff = min(backoff * 2, 5.0)
            if self._closing and time.monotonic() > self._deadline:
                self._lose("shutdown:")
                return

    def _lose(self, why: str) -> None:
        lost = len(self._retry) + self._queue.qsize()
        self._metrics.records_dropped += lost
        log.error("%s %d records could not be written", why, lost)
        self._retry = []

    def _drain(self, into: list[Record], limit: int) -> None:
        while len(into) < limit and not self._queue.empty():
            into.append(self._queue.get_nowait())

    def _fit_and_write(self, batch: list[Record]) -> list[tuple[Record, list[str]]]:
        """In the worker thread: make the batch storable, then write it."""
        fitted = [(r, changed) for r in batch if (changed := fit_record(r))]
        self._write(batch)
        return fitted

    async def _write_batch(self, batch: list[Record]) -> list[Record]:
        """Write `batch`; the records to retry (the store was unavailable), else none."""
        try:
            fitted = await asyncio.to_thread(self._fit_and_write, batch)
        except Exception as exc:  # noqa: BLE001 - what one record holds must not stop the rest
            if _unavailable(exc):
                self._failing = True
                self._metrics.write_errors += 1
                self.last_error, self.last_error_at = _first_line(exc), time.time()
                log.error("store write failed (%d records kept for retry): %s", len(batch),
                          self.last_error)
                return batch
            if len(batch) == 1:
                self._reject(batch[0], exc)
                return []
            half = len(batch) // 2
            return await self._write_batch(batch[:half]) + await self._write_batch(batch[half:])
        self._failing = False
        self._metrics.records_written += len(batch)
        self._sanitised(fitted)
        return []

    def _reject(self, record: Record, exc: Exception) -> None:
        self._metrics.records_rejected += 1
        self.last_error, self.last_error_at = _first_line(exc), time.time()
        log.error("the store refused the record of request %s, dropped alone: %s",
                  record.request.get("id"), self.last_error)

    def _sanitised(self, fitted: list[tuple[Record, list[str]]]) -> None:
        self._metrics.records_sanitised += len(fitted)
        for record, changed in fitted:
            new = [f for f in changed if f not in self._logged_fields]
            if new:  # once per field: a client repeating itself must not flood the log
                self._logged_fields.update(new)
                log.warning("request %s: %s did not fit the store as sent; stored sanitised "
                            "(counted in dynasor_records_sanitised_total)",
                            record.request.get("id"), ", ".join(new))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write everything still queued, retrying until `timeout_s`, then stop."""
        self._closing = True
        self._deadline = time.monotonic() + timeout_s
        if self._restart is not None:  # the writer died a moment ago: restart it now
            self._restart.cancel()
            self._restarted()
        while (task := self._task) is not None:
            await asyncio.wait({task})
            if self._task is task:  # not restarted (`_ended` runs before this wakes up)
                return


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
