"""Benchmarks of dynasor past one machine: rollout propagation to several proxies, and
calibration over a large store read from its Parquet export. Benchmarks, not tests: they
print what they measured, on whatever machine runs them.

- `propagation`: `proxies` real `dynasorctl observe` processes on one store, a scope in
  enforce; `rollout.kill` (what `dynasorctl rollout kill` runs) commits, and each proxy's
  /health is polled every 10 ms until it shows observe. The time from the kill's commit to
  the last proxy enforcing nothing, `repeats` times.
- `calibrate_parquet`: a SQLite store seeded with `requests` requests (as `bench dashboard`
  seeds: one in five probed 16 times), exported to Parquet, then `dynasorctl calibrate
  --parquet` run as its own process: wall time and peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import insert

from dynasorctl.bench.dashboard_bench import POLICY, seed
from dynasorctl.export import export
from dynasorctl.stack import free_port
from dynasorctl.stack import proxies as running_proxies
from proxy.control import rollout
from proxy.store.db import open_store
from proxy.store.models import PolicyRow


@dataclass(frozen=True)
class Propagation:
    proxies: int
    seconds: list[float]  # per kill: commit to the last proxy in observe

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _mode(url: str) -> str:
    rollout_state = httpx.get(url + "/health", timeout=10).json()["rollout"]
    return rollout_state["scopes"]["*"]["mode"] if rollout_state["source"] == "store" else "flags"


def _until(urls: list[str], mode: str, timeout_s: float = 30) -> float:
    """Seconds until every proxy shows `mode`, polling each every 10 ms."""
    started = time.monotonic()
    pending = set(urls)
    while pending:
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{len(pending)} proxies not in {mode} after {timeout_s} s")
        pending = {u for u in pending if _mode(u) != mode}
        if pending:
            time.sleep(0.01)
    return time.monotonic() - started


def propagation(url: str, proxies: int, repeats: int, logs: Path,
                say: Callable[[str], None] = print) -> Propagation:
    engine = open_store(url)
    with engine.begin() as conn:
        policy = conn.execute(insert(PolicyRow).returning(PolicyRow.id), [{
            "kind": "cot", "model": "*", "version": 1_000_000 + int(time.time()),
            "policy_toml": POLICY, "source": "bench", "created_at": datetime.now(UTC)}]).scalar()
    upstream = f"http://127.0.0.1:{free_port()}"  # never called: only /health is read
    logs.mkdir(parents=True, exist_ok=True)
    took = []
    with running_proxies(proxies, upstream, url, logs) as urls:
        for _ in range(repeats):
            rollout.set_scope(engine, "*", mode="enforce", percent=10, policy=policy,
                              reason="bench", who="bench")
            _until(urls, "enforce")
            rollout.kill(engine, reason="bench: propagation", who="bench")
            took.append(_until(urls, "observe"))
            say(f"kill reached all {proxies} proxies in {took[-1] * 1000:.0f} ms")
    engine.dispose()
    return Propagation(proxies, took)


@dataclass(frozen=True)
class ParquetCalibration:
    requests: int
    seed_s: float
    export_s: float
    export_bytes: int
    calibrate_s: float
    peak_rss_mb: float
    output: str  # the command's report


def calibrate_parquet(requests: int, workdir: Path, target: list[str],
                      say: Callable[[str], None] = print) -> ParquetCalibration:
    store, out = workdir / "store.db", workdir / "parquet"
    started = time.perf_counter()
    engine = seed(store, requests, datetime.now(UTC), say)
    seed_s = time.perf_counter() - started
    say(f"seeded {requests:,} requests in {seed_s:.0f} s; exporting")
    started = time.perf_counter()
    export(engine, out, say)
    export_s = time.perf_counter() - started
    engine.dispose()
    size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    say(f"exported in {export_s:.0f} s ({size / 1e6:.0f} MB); calibrating from Parquet")
    started = time.perf_counter()
    returncode, output, peak = _run_measured(
        [sys.executable, "-m", "dynasorctl", "calibrate", "--parquet", str(out), *target,
         "--workers", "1", "--cache-dir", str(workdir / "cache")], workdir / "calibrate.log")
    calibrate_s = time.perf_counter() - started
    if returncode not in (0, 2):  # 2: no policy met the target, still a full calibration
        raise RuntimeError(f"calibrate failed ({returncode}): {output[-2000:]}")
    return ParquetCalibration(requests, seed_s, export_s, size, calibrate_s, peak / 1024, output)


def _run_measured(cmd: list[str], log: Path) -> tuple[int, str, int]:
    """Run `cmd` to its end: (exit code, its output, its peak resident memory in KiB).

    The peak is the child's own (wait4), not RUSAGE_CHILDREN's, which is the largest of
    every child this process ever waited for (an engine a test suite started earlier)."""
    with log.open("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return proc.returncode, out.read(), usage.ru_maxrss
