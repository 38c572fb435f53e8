"""Migration 0007 (probe confidence, kind and trigger position; the stop's source): up and
down with data kept, old probes read as periodic, and the new columns written and read."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, inspect, select
from sqlalchemy.orm import Session

from proxy.store import db
from proxy.store.models import ProbeRow, RequestRow
from proxy.store.recorder import Record, write_records

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _record(rid: str, new: bool = False) -> Record:
    request = {"id": rid, "created_at": NOW, "model": "m", "kind": "chat", "upstream": "u",
               "mode": "enforce", "stream": True, "n": 1, "status_code": 200, "probed": True,
               "probe_count": 2, "probe_tokens": 6, "decision_token": 130, "decision_answer": "5"}
    probes = [{"request_id": rid, "choice_index": 0, "position": p, "answer": "5",
               "hesitant": False, "output_tokens": 3, "latency_ms": 1.0, "status": "ok",
               "certaindex": None} for p in (64, 130)]
    if new:
        request["stop_source"] = "trial"
        probes[0].update(kind="periodic", confidence=0.5, trigger_position=None)
        probes[1].update(kind="trial", confidence=0.9999, trigger_position=131)
    return Record(request, probes)


def _columns(engine: Engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


@pytest.fixture()
def engine(tmp_path) -> Engine:
    return db.make_engine(f"sqlite:///{tmp_path}/s.db")


def test_up_and_down_keep_the_data(engine: Engine) -> None:
    db.upgrade(engine, "0006")
    write_records(engine, [_record("old")])
    assert "confidence" not in _columns(engine, "probes")
    db.upgrade(engine, "0007")
    assert {"confidence", "kind", "trigger_position"} <= _columns(engine, "probes")
    assert "stop_source" in _columns(engine, "requests")
    write_records(engine, [_record("new", new=True)])
    with Session(engine) as s:
        rows = s.execute(select(ProbeRow.request_id, ProbeRow.kind, ProbeRow.confidence,
                                ProbeRow.trigger_position).order_by(ProbeRow.id)).all()
        assert [tuple(r) for r in rows] == [("old", "periodic", None, None),
                                            ("old", "periodic", None, None),
                                            ("new", "periodic", 0.5, None),
                                            ("new", "trial", 0.9999, 131)]
        sources = dict(s.execute(select(RequestRow.id, RequestRow.stop_source)).tuples().all())
        assert sources == {"old": None, "new": "trial"}
    db.downgrade(engine, "0006")
    assert not {"confidence", "kind", "trigger_position"} & _columns(engine, "probes")
    assert "stop_source" not in _columns(engine, "requests")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM probes").scalar() == 4
        assert conn.exec_driver_sql("SELECT count(*) FROM requests").scalar() == 2
    db.upgrade(engine)
    assert db.current(engine) == "0007"
    with Session(engine) as s:
        assert s.scalars(select(ProbeRow.kind)).all() == ["periodic"] * 4
