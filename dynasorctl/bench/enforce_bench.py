"""`dynasorctl bench enforce`: what enforcement really does, beside what `evaluate` predicted.

Every problem of a trace file goes through the proxy in enforce mode (100%) in
front of the replay upstream; the answers clients received are graded against
the gold answers, and the tokens the upstream really generated and the probes
really sent give the net savings. Chain-of-thought traces go as plain streaming
clients; self-consistency programs as one non-streamed request of n samples
(seed 0: the replay answers sample i to seed i, in recorded order).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from dynasorctl.calibration.evaluate import Summary, evaluate_cot, evaluate_sc
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.observed import ObservedRun, program_from_trace, run_from_trace
from dynasorctl.calibration.sc import replay_program
from dynasorctl.calibration.table import PROBE_PROMPT_COST
from dynasorctl.stack import replay_and_proxy
from dynasorctl.traces import CotTrace, ScProgram
from dynasorctl.trials import Trials
from proxy.core.certaindex import extract_boxed
from proxy.core.policy import PolicyFile
from proxy.store.db import open_store
from proxy.store.models import RequestRow

T = TypeVar("T")


@dataclass(slots=True)
class Received:
    """What one client got through the enforcing proxy, and what the full run would have been."""

    answer: str | None
    generated: int  # main tokens the upstream really generated
    stopped: bool
    full_tokens: int  # main tokens of the unstopped run (every sample of a program)
    full_answer: str | None  # the unstopped run's answer (a program's majority)
    full_correct: bool
    gold: str | None
    past_decision: int = 0  # tokens generated after the decision, while its probe was answered


@dataclass(frozen=True, slots=True)
class Observed:
    runs: int
    stopped: float
    net_saved: float
    accuracy_full: float
    accuracy_policy: float
    probes: int
    probe_tokens: int
    past_decision: float  # share of all tokens generated after the decisions (probe latency)


async def _trace_client(proxy_url: str, trace: CotTrace, client: httpx.AsyncClient) -> Received:
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
    stopped = ext is not None
    generated = int(ext["generated_tokens"]) if stopped else trace.completion_tokens
    return Received(extract_boxed("".join(text)), generated, stopped,
                    trace.completion_tokens, trace.final_answer, bool(trace.final_correct), trace.gold,
                    max(generated - int(ext["stop_token"]), 0) if stopped else 0)


def _program_client(grader: Grader) -> Callable[[str, ScProgram, httpx.AsyncClient], Awaitable[Received]]:
    async def send(proxy_url: str, program: ScProgram, client: httpx.AsyncClient) -> Received:
        body = {"model": program.model, "seed": 0, "n": len(program.samples),
                "messages": [{"role": "user", "content": program.problem}]}
        resp = await client.post(f"{proxy_url}/v1/chat/completions", json=body)
        resp.raise_for_status()
        ext = resp.json()["dynasor"]
        full = replay_program(program_from_trace(program), None, grader)
        return Received(ext["answer"], int(ext["generated_tokens"]), bool(ext["stopped"]), full.tokens,
                        full.answer, grader.same(program.gold, full.answer), program.gold)

    return send


async def send_through(proxy_url: str, items: Sequence[T], concurrency: int, on_done: Callable[[], object],
                       client_for: Callable[[str, T, httpx.AsyncClient], Awaitable[Received]],
                       ) -> list[Received]:
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(item: T) -> Received:
            async with slots:
                got = await client_for(proxy_url, item, client)
            on_done()
            return got

        return list(await asyncio.gather(*(one(t) for t in items)))


def observed(received: list[Received], db_url: str, grader: Grader) -> Observed:
    """Accuracy and net savings of what clients got, graded as `evaluate` grades."""
    with Session(open_store(db_url)) as s:
        rows = s.scalars(select(RequestRow)).all()
    probes = sum(r.probe_count for r in rows)
    probe_tokens = sum(r.probe_tokens for r in rows)
    total = sum(r.full_tokens for r in received)
    generated = sum(r.generated for r in received)
    right_full = right_policy = 0
    for r in received:
        right_full += r.full_correct
        if not r.stopped or grader.same(r.full_answer, r.answer):
            right_policy += r.full_correct  # an unchanged answer keeps its grading, as in evaluate
        else:
            right_policy += grader.same(r.gold, r.answer)
    n = len(received)
    cost = probe_tokens + PROBE_PROMPT_COST * probes
    return Observed(
        runs=n, stopped=sum(r.stopped for r in received) / n,
        net_saved=(total - generated - cost) / total,
        accuracy_full=right_full / n, accuracy_policy=right_policy / n,
        probes=probes, probe_tokens=probe_tokens,
        past_decision=sum(r.past_decision for r in received) / total,
    )


def predicted(records: Sequence[CotTrace] | Sequence[ScProgram], policy: PolicyFile,
              grader: Grader, trials: Trials | None = None) -> Summary:
    if policy.kind == "sc":
        return evaluate_sc([program_from_trace(p) for p in records], policy, grader)[1]  # type: ignore[arg-type]
    runs: list[ObservedRun] = [
        run_from_trace(t, None if trials is None else trials.by_trace[t.trace_id])  # type: ignore[union-attr]
        for t in records]
    return evaluate_cot(runs, policy, grader, trials=None if trials is None else trials.setup)[1]


def run(traces_file: Path, records: Sequence[CotTrace] | Sequence[ScProgram], policy_file: Path,
        policy: PolicyFile, tokens_per_second: float, concurrency: int,
        on_done: Callable[[], object], trials: Trials | None = None) -> tuple[Summary, Observed]:
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"dynasor-bench-enforce-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{logs}/enforce.db"
    proxy_args = ["--db", db_url, "--mode", "enforce", "--policy", str(policy_file)]
    with Grader() as grader:
        client_for = _program_client(grader) if policy.kind == "sc" else _trace_client
        with replay_and_proxy(traces_file, tokens_per_second, proxy_args, logs) as (_, proxy_url):
            received = asyncio.run(send_through(proxy_url, records, concurrency, on_done, client_for))
        return predicted(records, policy, grader, trials), observed(received, db_url, grader)
