"""`dynasorctl bench enforce`: what enforcement really does, beside what `evaluate` predicted.

Every problem of a trace file goes through the proxy in enforce mode (100%) in
front of the replay upstream, as a plain streaming client; the answers clients
received are graded against the gold answers, and the tokens the upstream
really generated and the probes really sent give the net savings.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from dynasorctl.calibration.evaluate import Summary, evaluate_cot
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.observed import ObservedRun, run_from_trace
from dynasorctl.calibration.table import PROBE_PROMPT_COST
from dynasorctl.stack import replay_and_proxy
from dynasorctl.traces import CotTrace
from proxy.certaindex import extract_boxed
from proxy.policy import PolicyFile
from proxy.store.db import open_store
from proxy.store.models import RequestRow


@dataclass(slots=True)
class Received:
    """What one client got through the enforcing proxy."""

    trace: CotTrace
    answer: str | None
    generated: int  # main tokens the upstream really generated
    stopped: bool


@dataclass(frozen=True, slots=True)
class Observed:
    runs: int
    stopped: float
    net_saved: float
    accuracy_full: float
    accuracy_policy: float
    probes: int
    probe_tokens: int


async def _client(proxy_url: str, trace: CotTrace, client: httpx.AsyncClient) -> Received:
    body = {"model": trace.model, "seed": trace.seed, "stream": True,
            "messages": [{"role": "user", "content": trace.problem}]}
    text: list[str] = []
    ext = None
    async with client.stream("POST", f"{proxy_url}/v1/chat/completions", json=body) as resp:
        buffer = b""
        async for chunk in resp.aiter_bytes():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                data = json.loads(event[6:])
                ext = data.get("dynasor", ext)
                for choice in data.get("choices") or ():
                    text.append((choice.get("delta") or {}).get("content") or "")
    if ext is not None:
        return Received(trace, extract_boxed("".join(text)), int(ext["generated_tokens"]), True)
    return Received(trace, extract_boxed("".join(text)), trace.completion_tokens, False)


async def send_through(proxy_url: str, traces: list[CotTrace], concurrency: int,
                       on_done) -> list[Received]:
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(trace: CotTrace) -> Received:
            async with slots:
                got = await _client(proxy_url, trace, client)
            on_done()
            return got

        return list(await asyncio.gather(*(one(t) for t in traces)))


def observed(received: list[Received], db_url: str, grader: Grader) -> Observed:
    """Accuracy and net savings of what clients got, graded as `evaluate` grades."""
    with Session(open_store(db_url)) as s:
        rows = s.scalars(select(RequestRow)).all()
    probes = sum(r.probe_count for r in rows)
    probe_tokens = sum(r.probe_tokens for r in rows)
    total = sum(r.trace.completion_tokens for r in received)
    generated = sum(r.generated for r in received)
    right_full = right_policy = 0
    for r in received:
        full = bool(r.trace.final_correct)
        right_full += full
        if not r.stopped or grader.same(r.trace.final_answer, r.answer):
            right_policy += full  # an unchanged answer keeps its grading, as in evaluate
        else:
            right_policy += grader.same(r.trace.gold, r.answer)
    n = len(received)
    cost = probe_tokens + PROBE_PROMPT_COST * probes
    return Observed(
        runs=n, stopped=sum(r.stopped for r in received) / n,
        net_saved=(total - generated - cost) / total,
        accuracy_full=right_full / n, accuracy_policy=right_policy / n,
        probes=probes, probe_tokens=probe_tokens,
    )


def predicted(traces: list[CotTrace], policy: PolicyFile, grader: Grader) -> Summary:
    runs: list[ObservedRun] = [run_from_trace(t) for t in traces]
    return evaluate_cot(runs, policy, grader)[1]


def run(traces_file: Path, traces: list[CotTrace], policy_file: Path, policy: PolicyFile,
        tokens_per_second: float, concurrency: int, on_done) -> tuple[Summary, Observed]:
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"dynasor-bench-enforce-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{logs}/enforce.db"
    proxy_args = ["--db", db_url, "--mode", "enforce", "--policy", str(policy_file)]
    with replay_and_proxy(traces_file, tokens_per_second, proxy_args, logs) as (_, proxy_url):
        received = asyncio.run(send_through(proxy_url, traces, concurrency, on_done))
    with Grader() as grader:
        return predicted(traces, policy, grader), observed(received, db_url, grader)
