"""`dynasorctl bench enforce`: what enforcement really does, beside what `evaluate` predicted.

Every problem of a trace file goes through the proxy in enforce mode (100%) in
front of the replay upstream (with the trial files, if any: it answers trials from
them); the answers clients received are graded against the gold answers, and the
tokens the upstream really generated and the probes really sent give the net
savings. Chain-of-thought traces go as plain streaming clients; self-consistency
programs as one non-streamed request of n samples (seed 0: the replay answers
sample i to seed i, in recorded order).

Two predictions stand beside what was observed: `evaluate`'s, and `evaluate`'s on
the token positions the replay streams at. The replay cuts a recorded text into
`completion_tokens` pieces of equal length (it has no tokenizer), so a transition
word is at a (proportional) token position that differs from the one the trial file
recorded with the model's tokenizer; the second prediction puts each trial where
the replay's stream has its word (as statements and the end of thinking already
are), which is what the proxy in front of the replay can reproduce exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from dynasorctl.calibration.evaluate import Summary, evaluate_cot, evaluate_sc
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.observed import (
    ObservedRun,
    load_trace_files,
    program_from_trace,
)
from dynasorctl.calibration.sc import replay_program
from dynasorctl.calibration.table import PROBE_PROMPT_COST
from dynasorctl.stack import replay_and_proxy
from dynasorctl.traces import CotTrace, ScProgram
from dynasorctl.trials import load_trials
from proxy.core.certaindex import extract_boxed
from proxy.core.policy import PolicyFile
from proxy.core.text import token_position
from proxy.store.db import open_store
from proxy.store.models import RequestRow

T = TypeVar("T")


@dataclass(slots=True)
class Received:
    """What one client got through the enforcing proxy, and what the full run would have been."""

    key: str  # the trace (or program) id
    answer: str | None
    generated: int  # main tokens the upstream really generated
    stopped: bool
    source: str | None  # where a stop's answer came from
    stop_token: int | None  # where the policy stopped (chain-of-thought)
    full_tokens: int  # main tokens of the unstopped run (every sample of a program)
    full_answer: str | None  # the unstopped run's answer (a program's majority)
    full_correct: bool
    gold: str | None


@dataclass(frozen=True, slots=True)
class Observed:
    runs: int
    stopped: float
    net_saved: float
    accuracy_full: float
    accuracy_policy: float
    probes: int
    probe_tokens: int
    sources: dict[str, int]  # stops by where their answer came from: probe, trial, text
    # Chain-of-thought: net saved had the upstream stopped right at each decision (what
    # `evaluate` counts; the tokens generated meanwhile, while a probe or trial was out or
    # the proxy busy, are the difference), and the traces decided as predicted.
    net_saved_at_stops: float | None = None
    as_predicted: int | None = None


@dataclass(frozen=True, slots=True)
class Predicted:
    evaluate: Summary  # `evaluate` on the trace (and trial) files
    replayed: Summary | None  # the same, trials at the replay's token positions (None: no trials)
    decisions: dict[str, tuple[int | None, str | None]] | None = None  # per trace, at the
    # replay's positions: (stop token, source)


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
    return Received(trace.trace_id, extract_boxed("".join(text)),
                    int(ext["generated_tokens"]) if stopped else trace.completion_tokens, stopped,
                    ext.get("source") if stopped else None, ext["stop_token"] if stopped else None,
                    trace.completion_tokens, trace.final_answer, bool(trace.final_correct),
                    trace.gold)


def _program_client(grader: Grader) -> Callable[[str, ScProgram, httpx.AsyncClient], Awaitable[Received]]:
    async def send(proxy_url: str, program: ScProgram, client: httpx.AsyncClient) -> Received:
        body = {"model": program.model, "seed": 0, "n": len(program.samples),
                "messages": [{"role": "user", "content": program.problem}]}
        resp = await client.post(f"{proxy_url}/v1/chat/completions", json=body)
        resp.raise_for_status()
        ext = resp.json()["dynasor"]
        full = replay_program(program_from_trace(program), None, grader)
        return Received(program.program_id, ext["answer"], int(ext["generated_tokens"]),
                        bool(ext["stopped"]), None, None, full.tokens, full.answer,
                        grader.same(program.gold, full.answer), program.gold)

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


def observed(received: list[Received], db_url: str, grader: Grader,
             decisions: dict[str, tuple[int | None, str | None]] | None = None) -> Observed:
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
    at_stops = as_predicted = None
    if decisions is not None:
        upto = sum(r.full_tokens if r.stop_token is None else r.stop_token for r in received)
        at_stops = (total - upto - cost) / total
        as_predicted = sum(decisions.get(r.key) == (r.stop_token, r.source) for r in received)
    return Observed(
        runs=n, stopped=sum(r.stopped for r in received) / n,
        net_saved=(total - generated - cost) / total,
        accuracy_full=right_full / n, accuracy_policy=right_policy / n,
        probes=probes, probe_tokens=probe_tokens,
        sources=dict(Counter(r.source for r in received if r.stopped and r.source)),
        net_saved_at_stops=at_stops, as_predicted=as_predicted,
    )


def predicted(traces_file: Path, records: Sequence[CotTrace] | Sequence[ScProgram],
              policy: PolicyFile, grader: Grader, trials: Sequence[Path] = ()) -> Predicted:
    if policy.kind == "sc":
        return Predicted(evaluate_sc([program_from_trace(p) for p in records], policy, grader)[1],  # type: ignore[arg-type]
                         None)
    wanted = {t.trace_id for t in records}  # type: ignore[union-attr]
    loaded = load_trace_files([traces_file], trials)
    runs = [r for r in loaded.data if r.run_id in wanted]  # type: ignore[union-attr]
    recorded_decisions, recorded = evaluate_cot(runs, policy, grader, trials=loaded.trials)  # type: ignore[arg-type]
    if not trials:
        return Predicted(recorded, None, _by_trace(recorded_decisions))
    by_id = {t.trace_id: t for t in records}  # type: ignore[union-attr]
    chars = load_trials(trials).chars
    moved = [_at_replay_positions(r, by_id[r.run_id], chars.get(r.run_id, ()))  # type: ignore[union-attr]
             for r in runs]
    decisions, replayed = evaluate_cot(moved, policy, grader, trials=loaded.trials)
    return Predicted(recorded, replayed, _by_trace(decisions))


def _by_trace(decisions: Sequence[dict]) -> dict[str, tuple[int | None, str | None]]:
    return {d["trace_id"]: (d["stop_token"], d["source"]) for d in decisions}


def _at_replay_positions(run: ObservedRun, trace: CotTrace,
                         chars: Sequence[int | None]) -> ObservedRun:
    """The run's trials at the token positions where the replay streams their words."""
    if run.trials is None:
        return run
    n, tokens = len(trace.text), trace.completion_tokens
    # `run.trials` lead the file's trials (those before the run ended), in the file's order.
    moved = [replace(t, position=token_position(c, n, tokens))
             for t, c in zip(run.trials, chars) if c is not None]
    return replace(run, trials=tuple(sorted(moved, key=lambda t: t.position)))


def run(traces_file: Path, records: Sequence[CotTrace] | Sequence[ScProgram], policy_file: Path,
        policy: PolicyFile, tokens_per_second: float, concurrency: int,
        on_done: Callable[[], object], trials: Sequence[Path] = ()) -> tuple[Predicted, Observed]:
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"dynasor-bench-enforce-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{logs}/enforce.db"
    proxy_args = ["--db", db_url, "--mode", "enforce", "--policy", str(policy_file)]
    with Grader() as grader:
        prediction = predicted(traces_file, records, policy, grader, trials)  # bad files fail first
        client_for = _program_client(grader) if policy.kind == "sc" else _trace_client
        with replay_and_proxy(traces_file, tokens_per_second, proxy_args, logs, trials) as (_, proxy_url):
            received = asyncio.run(send_through(proxy_url, records, concurrency, on_done, client_for))
        return prediction, observed(received, db_url, grader, prediction.decisions)
