"""`dynasorctl demo`: the main job on embedded defaults, end to end, in one command.

Starts the replay upstream on the shipped sample of real traces, the observing
proxy in front of it (both as real processes), streams every problem through
the proxy, then reads the store and shows what was observed: probes,
certaindex, where the paper's rule would have stopped, and at what cost.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from dynasorctl import traces
from dynasorctl.errors import UserError
from dynasorctl.options import DbOption, store
from dynasorctl.stack import replay_and_proxy
from proxy.core.policy import PAPER_DEFAULT, ProbeObservation, first_stop
from proxy.pipeline.equivalence import Equivalence
from proxy.pipeline.record import prompt_hash
from proxy.store.db import default_url
from proxy.store.models import ProbeRow, RequestRow

console = Console()


async def _send_all(proxy_url: str, problems: list[traces.CotTrace], concurrency: int) -> list[str]:
    """Stream every problem through the proxy as a plain OpenAI client would."""
    errors: list[str] = []
    slots = asyncio.Semaphore(concurrency)
    columns = (TextColumn("[bold]sending problems"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn())
    async with httpx.AsyncClient(base_url=proxy_url, timeout=300) as client:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("send", total=len(problems), tokens=0)

            async def one(trace: traces.CotTrace) -> None:
                body = {"model": trace.model, "seed": trace.seed, "stream": True, "messages": _messages(trace)}
                async with slots:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                        if resp.status_code != 200:
                            errors.append(f"{trace.trace_id}: HTTP {resp.status_code}")
                        async for _ in resp.aiter_bytes():
                            pass
                progress.update(task, advance=1, tokens=progress.tasks[0].fields["tokens"]
                                + trace.completion_tokens)

            await asyncio.gather(*(one(t) for t in problems))
    return errors


def _messages(trace: traces.CotTrace) -> list[dict[str, str]]:
    return [{"role": "user", "content": trace.problem}]


def _short(model: str) -> str:
    name = model.split("/")[-1]
    return name.replace("DeepSeek-R1-Distill-", "R1-")


def _report(db_url: str, problems: list[traces.CotTrace], upstream: str) -> None:
    by_hash = {prompt_hash("chat", {"messages": _messages(t)}): t for t in problems}
    engine = store(db_url)
    with Session(engine) as s:
        rows = s.scalars(select(RequestRow).where(RequestRow.upstream == upstream)
                         .order_by(RequestRow.created_at)).all()
        # The paper's rule reads the periodic probes (the trials are another signal's).
        probes = {r.id: s.scalars(select(ProbeRow).where(ProbeRow.request_id == r.id, ProbeRow.status == "ok",
                                                         ProbeRow.kind == "periodic")
                                  .order_by(ProbeRow.position)).all() for r in rows}
    eq = Equivalence()
    table = Table(title="What dynasor observed, and where the paper's rule would have stopped")
    for col in ("problem", "model", "tokens", "probes", "final answer", "stop at", "answer there"):
        table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=16)
    totals = {"tokens": 0, "saved": 0, "probe_tokens": 0, "stopped": 0, "changed": 0, "right_full": 0,
              "right_paper": 0, "n": 0}
    for row in rows:
        trace = by_hash.get(row.prompt_hash or "")
        if trace is None or row.completion_tokens is None:
            continue
        obs = [ProbeObservation(p.position, p.answer, p.hesitant, p.output_tokens) for p in probes[row.id]]
        index, decision = first_stop(PAPER_DEFAULT, obs)
        stop_at = obs[index].position if index is not None else None
        answer = decision.answer if index is not None else row.final_answer
        same = eq.same(answer, row.final_answer)
        totals["n"] += 1
        totals["tokens"] += row.completion_tokens
        totals["probe_tokens"] += sum(p.tokens + 8 for p in obs[: (index + 1) if index is not None else None])
        totals["saved"] += row.completion_tokens - stop_at if stop_at is not None else 0
        totals["stopped"] += stop_at is not None
        totals["changed"] += not same
        totals["right_full"] += eq.same(trace.gold, row.final_answer)
        totals["right_paper"] += eq.same(trace.gold, answer)
        there = str(answer) if same else f"[red]{answer}[/]"
        table.add_row(f"{trace.dataset}/{trace.problem_id}", _short(trace.model), f"{row.completion_tokens:,}",
                      str(len(obs)), str(row.final_answer), "-" if stop_at is None else f"{stop_at:,}", there)
    console.print(table)
    n = max(totals["n"], 1)
    net = (totals["saved"] - totals["probe_tokens"]) / max(totals["tokens"], 1)
    console.print(
        f"[bold]{totals['n']} requests observed.[/] The paper's rule would have stopped "
        f"{totals['stopped']} ({totals['stopped'] / n:.0%}), saving {totals['saved']:,} of "
        f"{totals['tokens']:,} main tokens ({totals['saved'] / max(totals['tokens'], 1):.0%}; "
        f"{net:.0%} net of probe cost), but changing {totals['changed']} answers: accuracy "
        f"{totals['right_full'] / n:.0%} -> {totals['right_paper'] / n:.0%}.\n"
        "Naive early stopping is dangerous: `dynasorctl calibrate` finds what the data supports.\n"
        f"Stored in {db_url}: see `dynasorctl requests list`."
    )


def demo(
    db: DbOption = None,
    traces_file: Annotated[Path, typer.Option("--traces", help="Trace file to replay.")] = traces.PACKAGED_SAMPLE,
    tokens_per_second: Annotated[float, typer.Option(min=0, help="Replay speed per stream.")] = 2000.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Problems in flight at once.")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Send only the first N problems.")] = None,
) -> None:
    """Replay real traces through the observing proxy and show what it measured."""
    try:
        problems = traces.load_cot(traces_file)
    except traces.TraceFileError as exc:
        raise UserError(str(exc)) from exc
    problems = problems[:limit] if limit else problems
    db_url = db or default_url()
    store(db_url)  # fail early and clearly on a bad store
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"dynasor-demo-{os.getpid()}"
    # The shipped sample's trials let the replay answer the trials the proxy takes at "wait".
    trials = [traces.PACKAGED_TRIALS] if traces_file == traces.PACKAGED_SAMPLE else []
    with replay_and_proxy(traces_file, tokens_per_second, ["--db", db_url], logs,
                          trials) as (replay_url, proxy_url):
        console.print(f"replay upstream: {len(problems)} recorded traces on {replay_url}; "
                      f"proxy on {proxy_url}; store {db_url}")
        errors = asyncio.run(_send_all(proxy_url, problems, concurrency))
    if errors:
        raise UserError(f"{len(errors)} requests failed, e.g. {errors[0]}; logs in {logs}")
    _report(db_url, problems, replay_url)


def register(app: typer.Typer) -> None:
    app.command()(demo)
