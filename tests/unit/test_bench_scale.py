"""The scale benchmarks' pieces work, on small sizes: store writes from several processes,
rollout propagation, calibration from a Parquet export. Correctness only: no figure is
asserted against a target here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dynasorctl.bench import scale_bench, store_bench
from proxy.store.db import open_store
from proxy.store.models import RequestRow


def test_store_writers_count_what_they_wrote(store_url: str) -> None:
    rate = store_bench.run(store_url, writers=2, seconds=3.0)
    assert rate.records > 0 and rate.write_errors == 0 and rate.per_second == rate.records / 3
    with Session(open_store(store_url)) as s:  # the rest was flushed when they stopped
        assert s.scalar(select(func.count()).select_from(RequestRow)) >= rate.records


def test_rollout_propagation_is_timed_per_kill(tmp_path: Path) -> None:
    p = scale_bench.propagation(f"sqlite:///{tmp_path}/s.db", proxies=1, repeats=2,
                                logs=tmp_path / "logs", say=lambda _: None)
    assert len(p.seconds) == 2 and all(0 < s < 30 for s in p.seconds)


def test_calibration_from_parquet_is_timed_with_its_peak_memory(tmp_path: Path) -> None:
    # A larger child waited for earlier (in a full suite: an engine) must not hide its peak.
    subprocess.run([sys.executable, "-c", "b = bytearray(1_500_000_000); b[::4096] = b'1' * len(b[::4096])"],
                   check=True, timeout=120)
    r = scale_bench.calibrate_parquet(2000, tmp_path, ["--max-answer-change", "40"],
                                      say=lambda _: None)
    assert "frontier of the tuning split" in r.output and "recommended:" in r.output, r.output
    assert r.export_bytes > 0 and r.peak_rss_mb > 50 and r.calibrate_s > 0
