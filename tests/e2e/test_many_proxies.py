"""Three `dynasorctl observe` processes on one PostgreSQL store, in front of one replay upstream:
records from every proxy land once each, a kill reaches all three, and a guardrail's
rollback written by one holds for all. How fast a change reaches them is measured by
`dynasorctl bench rollout` (a benchmark: wall-clock bounds do not belong in a test run on
a shared machine)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from dynasorctl import traces
from dynasorctl.stack import free_port, proxies, running
from proxy.control import rollout
from proxy.store.db import open_store
from proxy.store.models import PolicyRow, ProbeRow, RequestRow

POLICY = 'version = 1\nkind = "cot"\nmodel = "*"\n\n[cot]\ninterval = 64\nwindow = 4\n'
PROXIES = 3
PER_PROXY = 10  # 30 of the 32 packaged problems


def _modes(urls: list[str]) -> list[str]:
    return [httpx.get(u + "/health", timeout=10).json()["rollout"]["scopes"]["*"]["mode"]
            for u in urls]


def _until_all(urls: list[str], mode: str, timeout_s: float = 60) -> float:
    """Seconds until every proxy's /health shows `mode` for "*"."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if all(m == mode for m in _modes(urls)):
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not every proxy in {mode} after {timeout_s} s: {_modes(urls)}")


def test_three_proxies_share_one_postgres_store(pg_url, tmp_path):
    db = pg_url
    engine = open_store(db)
    with engine.begin() as conn:
        conn.execute(insert(PolicyRow), [{"kind": "cot", "model": "*", "version": 1,
                                          "policy_toml": POLICY, "source": "test",
                                          "created_at": datetime.now(UTC)}])
    rollout.set_scope(engine, "*", mode="enforce", percent=10, policy=1, reason="start",
                      who="test")
    sample = traces.load_cot(traces.PACKAGED_SAMPLE)
    replay_port = free_port()
    replay = f"http://127.0.0.1:{replay_port}"
    with running(["replay", "--port", str(replay_port), "--tokens-per-second", "2000"],
                 "replay", replay, tmp_path / "replay.log"), \
            proxies(PROXIES, replay, db, tmp_path) as urls:
        assert _modes(urls) == ["enforce"] * PROXIES

        # Traffic through all three at once: each request goes to one proxy.
        jobs = list(zip(itertools.cycle(urls), sample[:PROXIES * PER_PROXY]))

        def one(job: tuple[str, traces.CotTrace]) -> int:
            url, trace = job
            body = {"model": trace.model, "seed": trace.seed, "stream": True, "max_tokens": 384,
                    "messages": [{"role": "user", "content": trace.problem}]}
            return httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, jobs)) == [200] * len(jobs)

        # The kill switch, from the command line, reaches every proxy.
        killed = subprocess.run([sys.executable, "-m", "dynasorctl", "rollout", "kill",
                                 "--reason", "drill", "--db", db],
                                capture_output=True, text=True, timeout=120, check=False)
        assert killed.returncode == 0, killed.stderr
        _until_all(urls, "observe")

        # A guardrail's rollback (what a tripped proxy writes) holds for all three.
        rollout.set_scope(engine, "*", mode="enforce", percent=10, reason="again", who="test")
        _until_all(urls, "enforce")
        rollout.rollback(engine, "*", reason="guardrail: answers changed in 9% (test)")
        _until_all(urls, "shadow")

        # Every record written before the proxies stop (SIGTERM flushes in any case).
        deadline = time.monotonic() + 60
        while any(httpx.get(u + "/health").json()["store"]["pending"] for u in urls):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        written = [httpx.get(u + "/health").json()["store"]["written"] for u in urls]
    assert written == [PER_PROXY] * PROXIES
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(RequestRow)) == PROXIES * PER_PROXY
        assert s.scalar(select(func.count(func.distinct(RequestRow.prompt_hash)))) == len(jobs)
        assert s.scalar(select(func.count()).select_from(ProbeRow)) >= 2 * len(jobs)
