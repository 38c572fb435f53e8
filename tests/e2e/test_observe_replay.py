"""End to end: real recorded traces, replayed by `dynasorctl replay`, observed by the proxy."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from dynasorctl import traces
from dynasorctl.bench.enforce_bench import predicted
from dynasorctl.calibration.evaluate import evaluate_cot
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.store_source import STORE_TRIALS, load_runs
from dynasorctl.replay import serve_replay
from dynasorctl.trials import load_trials
from proxy.core.certaindex import normalize_answer
from proxy.core.policy import parse_policy_file
from proxy.core.text import token_position
from proxy.pipeline.app import create_app
from proxy.pipeline.equivalence import Equivalence
from proxy.settings import Settings
from proxy.store.db import open_store
from proxy.store.models import ProbeRow, RequestRow, SampleRow
from tests.servers import serving


async def test_probes_recorded_through_the_proxy_match_the_recorded_trace(tmp_path):
    sample = traces.load_cot(traces.PACKAGED_SAMPLE)[:6]
    db_url = f"sqlite:///{tmp_path}/obs.db"
    async with serve_replay(sample, tokens_per_second=1500) as upstream:
        # the traces were probed with up to 32 answer tokens; at the default 20 a long
        # answer is cut before its closing brace
        settings = Settings(upstream_url=upstream, db_url=db_url, probe_max_tokens=32)
        async with serving(create_app(settings)) as url, \
                httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one(trace):
                body = {"model": trace.model, "seed": trace.seed, "stream": True,
                        "messages": [{"role": "user", "content": trace.problem}]}
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")

            await asyncio.gather(*(one(t) for t in sample))
    engine = open_store(db_url)
    with Session(engine) as s:
        rows = s.scalars(select(RequestRow)).all()
        assert len(rows) == len(sample)
        by_tokens = {r.completion_tokens: r for r in rows}
        for trace in sample:
            row = by_tokens[trace.completion_tokens]
            assert normalize_answer(row.final_answer) == normalize_answer(trace.final_answer)
            assert row.finish_reason == trace.finish_reason
            probes = s.scalars(select(ProbeRow).where(ProbeRow.request_id == row.id,
                                                      ProbeRow.status == "ok",
                                                      ProbeRow.kind == "periodic")).all()
            assert len(probes) >= 3
            recorded = {p.position: p.answer for p in trace.probes}
            for p in probes:
                # the proxy's probe at position p got the answer the model gave there
                assert p.position % 64 == 0
                assert p.answer == recorded[p.position], (trace.trace_id, p.position)


async def test_observed_trials_replay_from_the_store_as_the_trial_file_does(tmp_path):
    """Observe takes trials at "wait" (DEER's settings); the replay answers them from the trial
    file; the store gives them back as the runs' trials, with the recorded answers and
    confidences, and `evaluate` over the store decides as over the trace and trial files."""
    sample = traces.load_cot(traces.PACKAGED_SAMPLE)[:8]
    trials = load_trials([traces.PACKAGED_TRIALS])
    db_url = f"sqlite:///{tmp_path}/obs.db"
    # One at a time, at a pace the probes keep up with on a busy machine (few periodic ones).
    async with serve_replay(sample, tokens_per_second=400, trials=trials) as upstream:
        settings = Settings(upstream_url=upstream, db_url=db_url, probe_max_tokens=32,
                            probe_interval=512, store_text=True)
        app = create_app(settings)
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:
            for trace in sample:
                body = {"model": trace.model, "seed": trace.seed, "stream": True,
                        "messages": [{"role": "user", "content": trace.problem}]}
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        assert app.metrics.probes["skipped"] == 0  # else the store lacks trials the file has
    found = load_runs(open_store(db_url))
    assert found.trials == STORE_TRIALS and len(found.runs) == len(sample)
    by_text = {r.text: r for r in found.runs}
    checked = 0
    for trace in sample:
        run = by_text[trace.text]
        closed = trace.text.find("</think>")
        recorded = [(token_position(c, len(trace.text), trace.completion_tokens), t.answer,
                     t.confidence) for t, c in zip(trials.by_trace[trace.trace_id],
                                                  trials.chars[trace.trace_id])
                    if c is not None and (closed < 0 or c < closed)]
        got = [(t.position, t.answer, t.confidence) for t in run.trials or ()]
        assert [(p, a) for p, a, _ in got] == [(p, a) for p, a, _ in recorded], trace.trace_id
        assert all(abs(x[2] - y[2]) < 1e-9 for x, y in zip(got, recorded))
        checked += len(got)
    assert checked > 20
    policy = parse_policy_file('version = 2\nkind = "cot"\n[cot]\nperiodic = false\n'
                               'think_end = true\n[cot.transition]\nmin_confidence = 0.999\n')
    with Grader() as grader:
        from_store, _ = evaluate_cot(found.runs, policy, grader, trials=found.trials)
        expected = predicted(traces.PACKAGED_SAMPLE, sample, policy, grader,
                             [traces.PACKAGED_TRIALS]).decisions
    runs_by_id = {r.run_id: r for r in found.runs}
    trace_of = {by_text[t.text].run_id: t.trace_id for t in sample}
    for d in from_store:
        assert (d["stop_token"], d["source"]) == expected[trace_of[d["trace_id"]]], \
            runs_by_id[d["trace_id"]].run_id


async def test_self_consistency_program_certaindex_from_real_samples(tmp_path):
    program = traces.load_sc(traces.PACKAGED_SAMPLE.with_name("sc-sample.jsonl.gz"))[0]
    db_url = f"sqlite:///{tmp_path}/obs.db"
    async with serve_replay([program]) as upstream:
        settings = Settings(upstream_url=upstream, db_url=db_url)
        async with serving(create_app(settings)) as url, \
                httpx.AsyncClient(base_url=url, timeout=120) as client:
            body = {"model": program.model, "n": len(program.samples),
                    "messages": [{"role": "user", "content": program.problem}]}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    with Session(open_store(db_url)) as s:
        samples = s.scalars(select(SampleRow).order_by(SampleRow.sample_index)).all()
    assert len(samples) == len(program.samples)
    eq = Equivalence()
    for got, recorded in zip(samples, program.samples):
        assert eq.same(got.answer, recorded.final_answer) or got.answer == recorded.final_answer
    assert all(0.0 <= x.certaindex <= 1.0 for x in samples)
    n_groups = len({x.answer_group for x in samples})
    assert (samples[-1].certaindex == 1.0) == (n_groups == 1)


def test_demo_command_runs_end_to_end(tmp_path):
    db = f"sqlite:///{tmp_path}/demo.db"
    result = subprocess.run([sys.executable, "-m", "dynasorctl", "demo", "--limit", "4", "--db", db],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 requests observed" in result.stdout
    assert "paper's rule would have stopped" in result.stdout
