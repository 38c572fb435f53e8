"""The dashboard on PostgreSQL: every query of a refresh (and the savings panel's reads) has a
plan that reads an index, never a whole `requests` or `probes` table.

The queries are the ones the dashboard really sends, captured from the engine, then EXPLAINed
with their parameters. With sequential scans disabled the planner still scans a table whole
when no index can serve the query, so a `Seq Scan` there is a missing index. (On a small
table PostgreSQL may prefer a scan when allowed to; the plans on 100,000 requests are in the
README.)
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import event

from dynasorctl.bench.dashboard_bench import MODELS, seed_engine
from dynasorctl.dashboard import savings
from dynasorctl.dashboard.source import Filters, StoreSource
from proxy.store.db import open_store

BIG_TABLES = ("requests", "probes")


def test_every_dashboard_read_is_index_backed_on_postgres(pg_url):
    engine = open_store(pg_url)
    now = datetime.now(UTC)
    seed_engine(engine, 3000, now, say=lambda _: None)
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append((statement, parameters))

    source = StoreSource(engine, clock=lambda: now)
    event.listen(engine, "before_cursor_execute", capture)
    source.traffic()
    source.certaindex_histogram()
    for filters in (Filters(), Filters(model="model-c"), Filters(mode="shadow"),
                    Filters(outcome="error"), Filters("model-b", "enforce", "enforced")):
        source.requests(filters)
    probed = source.requests(Filters(model=MODELS[0]), limit=5)[0].id
    source.timeline(probed)
    source.rollout()
    source.newest_policy()
    savings.read_decided(engine, "policy 1")
    savings.recent_runs(engine)
    event.remove(engine, "before_cursor_execute", capture)

    reads = [(s, p) for s, p in sent if s.lstrip().upper().startswith("SELECT")
             and any(t in s for t in BIG_TABLES)]
    assert len(reads) >= 14
    with engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in reads:
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement,
                                                                parameters))
            for table in BIG_TABLES:
                assert f"Seq Scan on {table}" not in plan, f"{statement}\n{plan}"
            assert "Index" in plan, plan
