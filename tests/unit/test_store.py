"""The store: migrations (empty, down and up with data, one head) and batched writes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from proxy.store import db
from proxy.store.models import ProbeRow, RequestRow, SampleRow
from proxy.store.recorder import Record, write_records


def _record(rid: str) -> Record:
    now = datetime.now(UTC)
    request = {"id": rid, "created_at": now, "model": "m", "kind": "chat", "upstream": "u", "mode": "observe",
               "stream": True, "n": 1, "status_code": 200, "probed": True, "probe_count": 1,
               "probe_tokens": 3}
    probe = {"request_id": rid, "choice_index": 0, "position": 64, "answer": "5", "hesitant": False,
             "output_tokens": 3, "latency_ms": 1.0, "status": "ok", "certaindex": 1 / 3}
    sample = {"program_id": "p", "request_id": rid, "choice_index": 0, "sample_index": 0, "answer": "5",
              "answer_group": 0, "completion_tokens": 10, "finish_reason": "stop", "certaindex": 0.0,
              "created_at": now}
    return Record(request, [probe], [sample])


def test_single_head():
    assert len(db.heads()) == 1


def test_upgrade_from_empty_then_write_and_read(store_url):
    engine = db.open_store(store_url)
    assert db.current(engine) == db.heads()[0]
    write_records(engine, [_record("a"), _record("b")])
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(RequestRow)) == 2
        assert s.scalar(select(func.count()).select_from(ProbeRow)) == 2
        assert s.scalar(select(func.count()).select_from(SampleRow)) == 2
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_downgrade_and_upgrade_with_data_present(store_url):
    engine = db.open_store(store_url)
    write_records(engine, [_record("a")])
    db.downgrade(engine, "base")
    assert db.current(engine) is None
    assert not db.has_schema(engine)
    db.upgrade(engine)
    write_records(engine, [_record("b")])
    with Session(engine) as s:
        assert s.scalars(select(RequestRow.id)).all() == ["b"]


def test_broken_database_file_is_a_clear_store_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(db.StoreError, match="file is not a database"):
        db.open_store(f"sqlite:///{bad}")


def test_not_a_url_is_a_clear_store_error():
    with pytest.raises(db.StoreError, match="not a database URL"):
        db.open_store("::nope::")


def test_default_url_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert db.default_url() == f"sqlite:///{tmp_path}/dynasor/dynasor.db"
    monkeypatch.setenv("DYNASOR_DB_URL", "sqlite:///x.db")
    assert db.default_url() == "sqlite:///x.db"


def test_0003_decision_columns_down_and_up_with_data(store_url):
    engine = db.open_store(store_url)
    rec = _record("a")
    rec.request.update(mode="enforce", policy="p.toml", decision_token=640, decision_answer="5", enforced=True)
    write_records(engine, [rec])
    db.downgrade(engine, "0002")
    db.upgrade(engine)
    write_records(engine, [_record("b")])
    with Session(engine) as s:
        rows = {r.id: r for r in s.scalars(select(RequestRow))}
    assert rows["a"].enforced is False  # the decision columns came back empty: downgrade dropped them
    assert rows["b"].enforced is False and rows["b"].decision_token is None


def test_every_migration_keeps_probes_and_samples(store_url):
    """Rebuilding `requests` in a batch migration must not cascade into its children."""
    engine = db.make_engine(store_url)
    db.upgrade(engine, "0001")
    write_records(engine, [_record("a"), _record("b")])
    db.upgrade(engine)
    db.downgrade(engine, "0001")
    db.upgrade(engine)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(RequestRow)) == 2
        assert s.scalar(select(func.count()).select_from(ProbeRow)) == 2
        assert s.scalar(select(func.count()).select_from(SampleRow)) == 2


def test_a_batch_written_again_lands_once(store_url):
    """A retried batch whose first commit did land (the server went away mid-commit) adds
    only what is new: no duplicate request, probe or sample, and the batch is not stuck."""
    engine = db.open_store(store_url)
    write_records(engine, [_record("a")])
    write_records(engine, [_record("a"), _record("b")])
    with Session(engine) as s:
        assert sorted(s.scalars(select(RequestRow.id))) == ["a", "b"]
        assert sorted(s.scalars(select(ProbeRow.request_id))) == ["a", "b"]
        assert sorted(s.scalars(select(SampleRow.request_id))) == ["a", "b"]


async def test_shutdown_right_after_a_put_writes_the_record():
    """A put() that wakes the writer just as its wait times out, then close(): still written.

    (asyncio.wait_for cancels a get() that the put had already woken; the record stays
    queued, and the writer must not leave on seeing the shutdown.)"""
    from proxy.metrics import Metrics
    from proxy.store.recorder import Recorder

    lost = 0
    for i in range(300):
        written: list = []
        recorder = Recorder(written.extend, Metrics(), flush_interval_s=0.0005)
        recorder.start()
        await asyncio.sleep(0.0005 * (i % 7))  # land the put at every phase of the timeout
        recorder.put(Record({"id": str(i)}))
        await recorder.close()
        lost += len(written) != 1
    assert lost == 0
