"""`dynasorctl export`: the store as Parquet, one directory per table and day, incremental.

Layout (hive partitioning, readable by DuckDB, Polars, Spark, pandas):

    OUT/requests/day=2026-11-30/part-0.parquet          requests, by the day (UTC) they came in
    OUT/probes/day=2026-11-30/part-0.parquet            their probes
    OUT/program_samples/day=2026-11-30/part-0.parquet   their self-consistency samples
    OUT/labels.parquet                                  every gold label (small: rewritten each run)
    OUT/_export.json                                    requests written per day

A run counts the store's requests per day (one scan of the created_at index) and rewrites
only the days whose count differs from what the last run wrote: the new day, and a past day
that received late records (a proxy's queue drained after an outage). Rows are never
updated in the store, so a day whose count is unchanged is unchanged. Days no longer in the
store (pruned) are kept: the export is also the archive. Each day is read in one snapshot
(its requests, probes and samples agree) and streamed to Parquet in batches, so memory stays
flat however large the store; each file is replaced atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, Connection, DateTime, Engine, Float, Integer, Select, func, select
from sqlalchemy.sql.schema import Table

from proxy.store.models import LabelRow, ProbeRow, RequestRow, SampleRow

MANIFEST = "_export.json"
BATCH = 50_000  # rows read and written at a time
FORMAT = 1


@dataclass(frozen=True)
class Exported:
    """What one run did."""

    days_written: list[str]
    requests: int  # rows written this run
    probes: int
    samples: int
    labels: int
    days_unchanged: int


def _arrow_schema(table: Table) -> Any:
    import pyarrow as pa

    def kind(column: Any) -> Any:
        t = column.type
        if isinstance(t, DateTime):
            return pa.timestamp("us", tz="UTC")
        if isinstance(t, Boolean):
            return pa.bool_()
        if isinstance(t, Integer):
            return pa.int64()
        if isinstance(t, Float):
            return pa.float64()
        return pa.string()

    return pa.schema([pa.field(c.name, kind(c)) for c in table.columns])


def _day_of(conn: Connection) -> Any:
    """SQL for a request's day (UTC) as YYYY-MM-DD, in the store's dialect."""
    created = RequestRow.created_at
    if conn.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", created), "YYYY-MM-DD")
    return func.date(created)  # SQLite keeps UTC times as text


def day_counts(engine: Engine) -> dict[str, int]:
    """Requests per day (UTC) in the store."""
    with engine.connect() as conn:
        day = _day_of(conn)
        rows = conn.execute(select(day, func.count()).group_by(day)).all()
    return {str(d): int(n) for d, n in rows if d is not None}


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose queries all see one state of the store (and change nothing)."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            snap = conn.execution_options(isolation_level="REPEATABLE READ")
            try:
                yield snap
            finally:
                snap.rollback()
        else:
            conn.exec_driver_sql("BEGIN")  # SQLite in WAL mode: a read transaction is one
            try:
                yield conn
            finally:
                conn.exec_driver_sql("ROLLBACK")


def _write(conn: Connection, query: Select, table: Table, path: Path) -> int:
    """Stream `query`'s rows (the columns of `table`, in order) into one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema(table)
    names = [c.name for c in table.columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    written = 0
    with pq.ParquetWriter(partial, schema, compression="zstd") as out:
        result = conn.execution_options(yield_per=BATCH).execute(query)
        for rows in result.partitions():
            columns = {name: [row[i] for row in rows] for i, name in enumerate(names)}
            out.write_table(pa.table(columns, schema=schema))
            written += len(rows)
        if written == 0:
            out.write_table(schema.empty_table())  # a day without samples still has its file
    os.replace(partial, path)
    return written


def _day_bounds(day: str) -> tuple[datetime, datetime]:
    start = datetime.combine(date.fromisoformat(day), time(), UTC)
    return start, start + timedelta(days=1)


def _write_day(engine: Engine, out: Path, day: str) -> tuple[int, int, int]:
    start, end = _day_bounds(day)
    r = RequestRow
    of_day = (r.created_at >= start, r.created_at < end)
    ids = select(r.id).where(*of_day)
    part = f"day={day}/part-0.parquet"
    with _snapshot(engine) as conn:
        n = _write(conn, select(*r.__table__.columns).where(*of_day)
                   .order_by(r.created_at, r.id), r.__table__, out / "requests" / part)
        p = _write(conn, select(*ProbeRow.__table__.columns)
                   .where(ProbeRow.request_id.in_(ids)).order_by(ProbeRow.id),
                   ProbeRow.__table__, out / "probes" / part)
        s = _write(conn, select(*SampleRow.__table__.columns)
                   .where(SampleRow.request_id.in_(ids)).order_by(SampleRow.id),
                   SampleRow.__table__, out / "program_samples" / part)
    return n, p, s


def read_manifest(out: Path) -> dict[str, int]:
    """Requests written per day by earlier runs ({} for a new directory)."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    if data.get("format") != FORMAT:
        raise ValueError(f"{out / MANIFEST}: not an export of this version")
    return {str(k): int(v) for k, v in data["days"].items()}


def _save_manifest(out: Path, days: dict[str, int]) -> None:
    partial = out / (MANIFEST + ".partial")
    partial.write_text(json.dumps({"format": FORMAT, "days": dict(sorted(days.items())),
                                   "updated_at": datetime.now(UTC).isoformat()}, indent=1))
    os.replace(partial, out / MANIFEST)


def export(engine: Engine, out: Path, say: Callable[[str], None] = lambda _: None) -> Exported:
    """Bring the Parquet export at `out` up to date with the store (see the module's doc)."""
    out.mkdir(parents=True, exist_ok=True)
    done = read_manifest(out)
    now = day_counts(engine)
    changed = sorted(day for day, n in now.items() if done.get(day) != n)
    totals = [0, 0, 0]
    for day in changed:
        n, p, s = _write_day(engine, out, day)
        done[day] = n
        totals = [totals[0] + n, totals[1] + p, totals[2] + s]
        _save_manifest(out, done)  # a run cut short keeps the days it finished
        say(f"{day}: {n:,} requests, {p:,} probes, {s:,} samples")
    with _snapshot(engine) as conn:
        labels = _write(conn, select(*LabelRow.__table__.columns).order_by(LabelRow.id),
                        LabelRow.__table__, out / "labels.parquet")
    _save_manifest(out, done)
    return Exported(changed, *totals, labels, len(now) - len(changed))
