"""`dynasorctl export` (the store as Parquet by day, incremental) and calibration reading it
back with DuckDB: the same runs and programs as from the live store, on both back ends."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import delete, insert

from dynasorctl.calibration import parquet_source, store_source
from dynasorctl.errors import UserError
from dynasorctl.export import export, read_manifest
from dynasorctl.traces import PACKAGED_SAMPLE
from proxy.store import db
from proxy.store.models import LabelRow, RequestRow
from proxy.store.recorder import write_records
from tests.jsonl import read_records
from tests.unit.test_calibrate_store import (
    SC_SAMPLE,
    START,
    cot_records,
    request_id,
    sc_records,
)


def _days(out: Path, table: str = "requests") -> list[str]:
    return sorted(p.name for p in (out / table).iterdir())


def test_the_export_reads_back_as_the_store(store_url: str, tmp_path: Path) -> None:
    traces = read_records(PACKAGED_SAMPLE)
    engine = db.open_store(store_url)
    write_records(engine, cot_records(traces) + sc_records(read_records(SC_SAMPLE)))
    with engine.begin() as conn:  # a label by request, one by prompt, and a newer one
        conn.execute(insert(LabelRow), [
            {"request_id": request_id(traces[0]["trace_id"]), "prompt_hash": None, "gold": "1",
             "source": "t", "created_at": START},
            {"request_id": None, "prompt_hash": store_source.load_runs(engine).runs[1].group,
             "gold": "2", "source": "t", "created_at": START},
            {"request_id": request_id(traces[0]["trace_id"]), "prompt_hash": None, "gold": "3",
             "source": "t", "created_at": START + timedelta(seconds=1)}])
    out = tmp_path / "export"
    done = export(engine, out)
    assert done.days_written == ["2026-01-01"] and done.labels == 3
    assert done.requests == 32 + 4 + 48

    live, archived = store_source.load_runs(engine), parquet_source.load_runs(out)
    assert archived == live and len(live.runs) == 32 and live.labelled == 2
    assert archived.runs[0].gold == "3"
    assert parquet_source.load_programs(out) == store_source.load_programs(engine)
    model = traces[3]["model"]
    assert parquet_source.load_runs(out, model) == store_source.load_runs(engine, model)
    newest = parquet_source.load_runs(out, newest=5).runs
    assert newest == live.runs[-5:]


def test_only_changed_days_are_written_again(store_url: str, tmp_path: Path) -> None:
    traces = read_records(PACKAGED_SAMPLE)[:6]
    records = cot_records(traces, text=False)[:6]
    for i, rec in enumerate(records):  # two days, three requests each
        rec.request["created_at"] = START + timedelta(days=i // 3, hours=i)
    engine = db.open_store(store_url)
    write_records(engine, records[:5])
    out = tmp_path / "export"
    first = export(engine, out)
    assert first.days_written == ["2026-01-01", "2026-01-02"] and first.requests == 5
    assert read_manifest(out) == {"2026-01-01": 3, "2026-01-02": 2}
    assert export(engine, out).days_written == []  # nothing new: nothing written

    write_records(engine, records[5:])  # a late record for the second day
    before = (out / "requests" / "day=2026-01-01" / "part-0.parquet").stat().st_mtime_ns
    again = export(engine, out)
    assert again.days_written == ["2026-01-02"] and again.days_unchanged == 1
    assert (out / "requests" / "day=2026-01-01" / "part-0.parquet").stat().st_mtime_ns == before
    assert pq.read_table(out / "requests" / "day=2026-01-02" / "part-0.parquet").num_rows == 3
    probes = pq.read_table(out / "probes" / "day=2026-01-02" / "part-0.parquet").num_rows
    assert probes == sum(len(t["probes"]) + 2 for t in traces[3:])  # ok, error, cancelled ones
    assert json.loads((out / "_export.json").read_text())["days"]["2026-01-02"] == 3

    with engine.begin() as conn:  # the store is pruned: the archive keeps the day
        conn.execute(delete(RequestRow).where(RequestRow.created_at < START + timedelta(days=1)))
    assert export(engine, out).days_written == []
    assert _days(out) == ["day=2026-01-01", "day=2026-01-02"]
    assert len(parquet_source.load_runs(out).runs) == 6


def test_an_empty_or_missing_export_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no Parquet export"):
        parquet_source.load_runs(tmp_path / "nothing")


def test_trials_and_confidence_read_back_from_the_export(store_url: str, tmp_path: Path) -> None:
    """Trials (probes of kind `trial`, migration 0007) come back as the runs' trials, as from
    the store, not as probes of the schedule."""
    from proxy.store.models import ProbeRow

    traces = read_records(PACKAGED_SAMPLE)[:4]
    engine = db.open_store(store_url)
    write_records(engine, cot_records(traces))
    with engine.begin() as conn:
        conn.execute(insert(ProbeRow), [
            {"request_id": request_id(t["trace_id"]), "choice_index": 0, "position": 100 + i,
             "answer": str(i), "hesitant": False, "output_tokens": 4, "latency_ms": 1.0,
             "status": "ok", "kind": "trial", "confidence": 0.99, "trigger_position": 99 + i}
            for i, t in enumerate(traces[:3])])
    out = tmp_path / "export"
    export(engine, out)
    live, archived = store_source.load_runs(engine), parquet_source.load_runs(out)
    assert archived == live and live.trials is not None
    assert [len(r.trials or ()) for r in archived.runs] == [1, 1, 1, 0]
    assert archived.runs[0].trials[0].confidence == 0.99
    assert all(not p.trial for r in archived.runs for p in r.probes)
