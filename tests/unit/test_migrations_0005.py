"""Migration 0005 (the dashboard's composite indexes): up and down with data kept, and
SQLite choosing them for the dashboard's newest-first reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.orm import Session

from proxy.store import db
from proxy.store.models import ProbeRow, RequestRow
from proxy.store.recorder import Record, write_records

NOW = datetime(2026, 1, 1, tzinfo=UTC)
NEW = {"ix_requests_model_created_at", "ix_requests_mode_created_at",
       "ix_requests_policy_created_at"}


def _record(i: int) -> Record:
    rid = f"r{i}"
    request = {"id": rid, "created_at": NOW - timedelta(seconds=i), "model": f"m{i % 3}",
               "kind": "chat", "upstream": "u", "mode": "shadow" if i % 2 else "observe",
               "stream": True, "n": 1, "status_code": 200, "probed": True, "probe_count": 1,
               "probe_tokens": 3, "policy": "policy 1" if i % 2 else None}
    probe = {"request_id": rid, "choice_index": 0, "position": 64, "answer": "5",
             "hesitant": False, "output_tokens": 3, "latency_ms": 1.0, "status": "ok",
             "certaindex": 0.5}
    return Record(request, [probe])


def _indexes(engine: Engine) -> set[str]:
    return {ix["name"] for ix in inspect(engine).get_indexes("requests")}


def _counts(engine: Engine) -> tuple[int, int]:
    with Session(engine) as s:
        return (s.scalar(select(func.count()).select_from(RequestRow)) or 0,
                s.scalar(select(func.count()).select_from(ProbeRow)) or 0)


@pytest.fixture()
def engine(store_url) -> Engine:
    return db.make_engine(store_url)


def test_up_and_down_keep_the_data(engine: Engine) -> None:
    db.upgrade(engine, "0004")
    write_records(engine, [_record(i) for i in range(10)])
    assert not NEW & _indexes(engine)
    db.upgrade(engine, "0005")
    assert NEW <= _indexes(engine)
    assert _counts(engine) == (10, 10)
    db.downgrade(engine, "0004")
    assert not NEW & _indexes(engine)
    assert "ix_requests_created_at" in _indexes(engine)  # the older indexes stay
    assert _counts(engine) == (10, 10)
    db.upgrade(engine)
    assert NEW <= _indexes(engine) and _counts(engine) == (10, 10)


@pytest.mark.parametrize(("column", "value", "index"), [
    ("model", "m1", "ix_requests_model_created_at"),
    ("mode", "shadow", "ix_requests_mode_created_at"),
    ("policy", "policy 1", "ix_requests_policy_created_at"),
])
def test_newest_first_by_a_column_reads_its_index_without_sorting(tmp_path, column, value, index):
    # SQLite's planner; PostgreSQL's is checked on the dashboard's own queries
    # (tests/unit/test_dashboard_postgres.py).
    engine = db.open_store(f"sqlite:///{tmp_path}/s.db")
    write_records(engine, [_record(i) for i in range(200)])
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        plan = " ".join(row[-1] for row in conn.execute(text(
            f"EXPLAIN QUERY PLAN SELECT id FROM requests WHERE {column} = :v "
            "ORDER BY created_at DESC LIMIT 100"), {"v": value}))
    assert index in plan and "TEMP B-TREE" not in plan
