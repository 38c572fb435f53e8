"""Migration 0002 (labels, policies): up, down and up again with data present, one head,
the constraints it creates, and models that match the migrated schema exactly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, delete, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from proxy.store import db
from proxy.store.models import Base, LabelRow, PolicyRow, ProbeRow, RequestRow, SampleRow
from proxy.store.recorder import Record, write_records

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _record(rid: str) -> Record:
    request = {"id": rid, "created_at": NOW, "model": "m", "kind": "chat", "upstream": "u",
               "mode": "observe", "stream": True, "n": 1, "status_code": 200, "probed": True,
               "probe_count": 1, "probe_tokens": 3, "prompt_hash": "a" * 64}
    probe = {"request_id": rid, "choice_index": 0, "position": 64, "answer": "5",
             "hesitant": False, "output_tokens": 3, "latency_ms": 1.0, "status": "ok",
             "certaindex": 1 / 3}
    sample = {"program_id": "p", "request_id": rid, "choice_index": 0, "sample_index": 0,
              "answer": "5", "answer_group": 0, "completion_tokens": 10, "finish_reason": "stop",
              "certaindex": 0.0, "created_at": NOW}
    return Record(request, [probe], [sample])


def _label(request_id: str | None = None, prompt_hash: str | None = None) -> dict:
    return {"request_id": request_id, "prompt_hash": prompt_hash, "gold": "5", "source": "test",
            "created_at": NOW}


def _policy(version: int, **more: object) -> dict:
    return {"kind": "cot", "model": "*", "version": version, "policy_toml": "version = 1\n",
            "source": "test", "created_at": NOW, "active": False, "note": None, **more}


def _counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as s:
        return {t.__tablename__: s.scalar(select(func.count()).select_from(t)) or 0
                for t in (RequestRow, ProbeRow, SampleRow)}


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


@pytest.fixture()
def engine(store_url) -> Engine:
    return db.make_engine(store_url)


def test_up_down_up_with_data_present(engine: Engine) -> None:
    db.upgrade(engine, "0001")
    write_records(engine, [_record("a"), _record("b")])
    observed = _counts(engine)
    assert "labels" not in _tables(engine)

    db.upgrade(engine, "0002")
    assert db.current(engine) == "0002" and {"labels", "policies"} <= _tables(engine)
    assert _counts(engine) == observed
    with engine.begin() as conn:
        conn.execute(insert(LabelRow), [_label(request_id="a"), _label(prompt_hash="a" * 64)])
        conn.execute(insert(PolicyRow), [_policy(1)])

    db.downgrade(engine, "0001")
    assert db.current(engine) == "0001"
    assert not {"labels", "policies"} & _tables(engine)
    assert _counts(engine) == observed  # the observations survive the way down

    db.upgrade(engine, "0002")
    assert db.current(engine) == "0002"
    assert _counts(engine) == observed
    write_records(engine, [_record("c")])
    with engine.begin() as conn:
        conn.execute(insert(LabelRow), [_label(request_id="c")])
        conn.execute(insert(PolicyRow), [_policy(1)])
    with Session(engine) as s:
        assert s.scalars(select(LabelRow.request_id)).all() == ["c"]
        assert s.scalars(select(PolicyRow.version)).all() == [1]


def test_models_match_the_migrated_schema(engine: Engine) -> None:
    db.upgrade(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"render_as_batch": True})
        assert compare_metadata(context, Base.metadata) == []


def test_label_names_exactly_one_target(engine: Engine) -> None:
    db.upgrade(engine)
    write_records(engine, [_record("a")])
    for bad in (_label(), _label(request_id="a", prompt_hash="a" * 64)):
        with pytest.raises(IntegrityError, match="ck_labels_one_target"), engine.begin() as conn:
            conn.execute(insert(LabelRow), [bad])
    with pytest.raises(IntegrityError, match="(?i)foreign key"), engine.begin() as conn:
        conn.execute(insert(LabelRow), [_label(request_id="nobody")])


def test_a_request_takes_its_labels_with_it(engine: Engine) -> None:
    db.upgrade(engine)
    write_records(engine, [_record("a")])
    with engine.begin() as conn:
        conn.execute(insert(LabelRow), [_label(request_id="a"), _label(prompt_hash="a" * 64)])
        conn.execute(delete(RequestRow).where(RequestRow.id == "a"))
    with Session(engine) as s:
        assert s.scalars(select(LabelRow.prompt_hash)).all() == ["a" * 64]


def test_policy_versions_are_unique_and_inactive_by_default(engine: Engine) -> None:
    db.upgrade(engine)
    with engine.begin() as conn:
        # Written without `active`, as another tool might: the database's default applies.
        conn.execute(text("INSERT INTO policies (kind, model, version, policy_toml, source, "
                          "created_at) VALUES ('cot', '*', 1, 'x', 's', '2026-01-01')"))
        conn.execute(insert(PolicyRow), [_policy(1, model="m"), _policy(2, active=True)])
    with Session(engine) as s:
        rows = s.execute(select(PolicyRow.model, PolicyRow.version, PolicyRow.active)
                         .order_by(PolicyRow.id)).all()
    assert rows == [("*", 1, False), ("m", 1, False), ("*", 2, True)]
    with pytest.raises(IntegrityError, match="(?i)unique"), engine.begin() as conn:
        conn.execute(insert(PolicyRow), [_policy(2)])
