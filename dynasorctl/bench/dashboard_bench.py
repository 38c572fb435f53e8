"""`dynasorctl bench dashboard`: every dashboard query timed on a store of 100,000 requests.

The store is seeded like a day of traffic (spread over 24 hours, four models, one
request in five probed 16 times, of those a fifth shadowed and a tenth enforced by one
policy, 1% errors) and migrated to head, so the indexes are the ones a real store has. Each
query runs once to warm the page cache, then `repeats` times; the median and the
worst are reported. A benchmark, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert

from dynasorctl.calibration.grading import Grader
from dynasorctl.dashboard import savings
from dynasorctl.dashboard.calibrate import CalibrationSettings, run_calibration
from dynasorctl.dashboard.source import Filters, StoreSource
from dynasorctl.errors import UserError
from proxy.control import rollout
from proxy.store.db import open_store
from proxy.store.models import PolicyRow, ProbeRow, RequestRow

MODELS = ("model-a", "model-b", "model-c", "model-d")
PROBES_PER_RUN = 16
POLICY = 'version = 1\nkind = "cot"\nmodel = "*"\n\n[cot]\ninterval = 64\nwindow = 3\n'
BATCH = 5000


@dataclass(frozen=True)
class Timing:
    query: str
    rows: int  # what the query returned (rows, runs or bins)
    median_ms: float
    max_ms: float


def _requests(n: int, now: datetime, rng: random.Random) -> Iterator[tuple[dict, list[dict]]]:
    span = timedelta(hours=24)
    for i in range(n):
        rid = f"{i:032x}"
        probed = i % 5 == 0
        roll = rng.random()
        # the proxy decides only on probes: shadowed and enforced requests are probed ones
        mode = ("shadow" if roll < 0.2 else "enforce" if roll < 0.3 else "observe") if probed \
            else "observe"
        error = rng.random() < 0.01
        tokens = rng.randint(300, 4000)
        final = str(rng.randint(0, 99))
        settle = rng.randint(1, PROBES_PER_RUN - 1)  # probes before the answer settles
        decided = mode != "observe"
        stop = 64 * (settle + 3) if decided and 64 * (settle + 3) < tokens else None
        request = {
            "id": rid, "created_at": now - span * (i / n), "model": MODELS[i % len(MODELS)],
            "kind": "chat", "upstream": "bench", "mode": mode, "stream": True, "n": 1,
            "status_code": 500 if error else 200, "error": "upstream 500" if error else None,
            "completion_tokens": None if error else (stop if mode == "enforce" and stop else tokens),
            "finish_reason": None if error else "stop", "final_answer": None if error else final,
            "probed": probed, "probe_count": PROBES_PER_RUN if probed else 0,
            "probe_tokens": 3 * PROBES_PER_RUN if probed else 0, "prompt_hash": f"{i % 7919:064x}",
            "policy": "policy 1" if mode != "observe" else None,
            "decision_token": stop, "decision_answer": final if stop else None,
            "enforced": mode == "enforce" and stop is not None,
        }
        probes = [{"request_id": rid, "choice_index": 0, "position": 64 * (k + 1),
                   "answer": final if k >= settle else str(rng.randint(100, 999)),
                   "hesitant": False, "output_tokens": 3, "latency_ms": 5.0, "status": "ok",
                   "certaindex": min(1.0, max(0, k - settle + 1) / 3)}
                  for k in range(PROBES_PER_RUN)] if probed and not error else []
        yield request, probes


def seed(path: Path, n: int, now: datetime, say: Callable[[str], None] = print) -> Engine:
    """A migrated SQLite store at `path` holding `n` requests and a rolled-out policy."""
    engine = open_store(f"sqlite:///{path}")
    seed_engine(engine, n, now, say)
    return engine


def seed_engine(engine: Engine, n: int, now: datetime,
                say: Callable[[str], None] = print) -> None:
    """Fill a migrated, empty store (SQLite or PostgreSQL) with `n` requests and a rolled-out
    policy, then refresh the planner's statistics."""
    rng = random.Random(0)
    requests: list[dict] = []
    probes: list[dict] = []

    def flush() -> None:
        with engine.begin() as conn:
            conn.execute(insert(RequestRow), requests)
            if probes:
                conn.execute(insert(ProbeRow), probes)
        requests.clear()
        probes.clear()

    for i, (request, its_probes) in enumerate(_requests(n, now, rng), 1):
        requests.append(request)
        probes.extend(its_probes)
        if len(requests) == BATCH:
            flush()
            if i % (BATCH * 4) == 0:
                say(f"seeded {i:,} requests")
    if requests:
        flush()
    with engine.begin() as conn:
        conn.execute(insert(PolicyRow), [{"kind": "cot", "model": "*", "version": 1,
                                          "policy_toml": POLICY, "source": "bench",
                                          "created_at": now}])
    rollout.set_scope(engine, "*", mode="enforce", percent=10, policy=1, reason="bench",
                      who="bench")
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()


def _time(name: str, read: Callable[[], Any], repeats: int,
          count: Callable[[Any], int] = len, warm: bool = True) -> Timing:
    result = read() if warm else None  # warm the page cache
    took = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = read()
        took.append((time.perf_counter() - started) * 1000)
    return Timing(name, count(result), statistics.median(took), max(took))


def run(path: Path, n: int = 100_000, repeats: int = 5, calibrate: bool = True,
        say: Callable[[str], None] = print) -> list[Timing]:
    """Seed a store of `n` requests at `path` (which must not exist), then time each query."""
    if path.exists():
        raise FileExistsError(f"{path} exists: the benchmark seeds a new store")
    now = datetime.now(UTC)
    started = time.perf_counter()
    engine = seed(path, n, now, say)
    say(f"seeded {n:,} requests in {time.perf_counter() - started:.1f} s")
    source = StoreSource(engine, clock=lambda: now)
    probed = source.requests(Filters(model=MODELS[0]), limit=5)[0].id
    runs = savings.recent_runs(engine)
    policy = savings.read_policy(engine, 1)
    assert policy is not None
    timings = [
        _time("traffic (5 min, 30 buckets)", source.traffic, repeats, lambda t: t.requests),
        _time("certaindex histogram", source.certaindex_histogram, repeats, sum),
        _time("requests, newest 100", source.requests, repeats),
        _time("requests, model filter", lambda: source.requests(Filters(model="model-c")),
              repeats),
        _time("requests, mode filter", lambda: source.requests(Filters(mode="shadow")), repeats),
        _time("requests, outcome error", lambda: source.requests(Filters(outcome="error")),
              repeats),
        _time("requests, model+mode+outcome",
              lambda: source.requests(Filters("model-b", "enforce", "enforced")), repeats),
        _time("timeline of one request", lambda: source.timeline(probed), repeats,
              lambda t: len(t.probes)),
        _time("rollout and audit", source.rollout, repeats, lambda r: len(r.scopes)),
        _time("newest policy", source.newest_policy, repeats, lambda p: int(p is not None)),
        _time("savings: decided requests", lambda: savings.read_decided(engine, "policy 1"),
              repeats),
        _time("savings: newest probed runs", lambda: savings.recent_runs(engine), repeats),
    ]
    with Grader(workers=1) as grader:
        timings.append(_time("savings: replay (evaluate_cot)",
                             lambda: savings.project(runs, policy, grader), repeats,
                             lambda p: p.runs))
    timings.append(_time("savings panel, all of it", lambda: source.savings(1), repeats,
                         lambda s: s.active.projected.runs if s.active.projected else 0))
    if calibrate:
        settings = CalibrationSettings(store=False)
        try:
            timings.append(_time("calibration (c), newest 5,000 runs",
                                 lambda: run_calibration(engine, settings), 1,
                                 lambda c: c.runs, warm=False))
        except UserError as exc:  # a store too small for the target: say so, keep the rest
            say(f"calibration not timed: {exc}")
    return timings
