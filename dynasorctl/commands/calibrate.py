"""`dynasorctl calibrate` and `dynasorctl evaluate`: find a policy, then check one."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine

from dynasorctl.calibration.candidates import Recorded, with_recorded_probes
from dynasorctl.calibration.evaluate import (
    Summary,
    check_schedule,
    evaluate_cot,
    evaluate_sc,
    probe_interval,
)
from dynasorctl.calibration.grading import Grader, load_cache, save_cache
from dynasorctl.calibration.metrics import Grades
from dynasorctl.calibration.observed import (
    ObservedProgram,
    ObservedRun,
    TraceData,
    load_trace_files,
)
from dynasorctl.calibration.policyfile import (
    dump_policy_file,
    read_policy_file,
    write_policy_file,
)
from dynasorctl.calibration.replay import Replayer
from dynasorctl.calibration.report import print_report, pts, save_png
from dynasorctl.calibration.sc import calibrate_sc
from dynasorctl.calibration.search import (
    SCHEDULES,
    Target,
    calibrate_cot,
    split_by_group,
)
from dynasorctl.calibration.store_source import StoreRuns, load_programs, load_runs, save_policy
from dynasorctl.calibration.table import build_table
from dynasorctl.calibration.targets import (
    check_reachable,
    limits,
    make_target,
    no_policy_message,
    problems_needed,
    provenance,
)
from dynasorctl.errors import UserError
from dynasorctl.options import store
from proxy.core.policy import CotPolicy, PolicyFile

# Reports are wide tables: outside a terminal (pipes, CI) do not squeeze them to 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynasor"


def _keep(cache: Path, grader: Grader) -> None:
    """Add what the grader learned to the cache; a cache never fails a run."""
    if grader.learned:
        with contextlib.suppress(OSError):
            save_cache(cache, {**load_cache(cache), **grader.learned})


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


class Kind(str, Enum):
    cot = "cot"
    sc = "sc"


KIND_NAMES = {"cot": "chain-of-thought", "sc": "self-consistency"}


@dataclass(slots=True)
class _Source:
    """What calibration runs on, and where it came from."""

    data: list[ObservedRun] | list[ObservedProgram]
    description: str  # the policy's provenance "source"
    records: str  # what its records are, for messages: "traces", "probed requests", ...
    engine: Engine | None = None  # the store the policy is kept in, if any
    notes: list[str] = field(default_factory=list)
    traces: TraceData | None = None  # what the trace files hold besides the runs
    recorded: str | None = None  # where the records were recorded: a store or an export


def _observations(traces: list[Path] | None, trials: list[Path] | None, db: str | None,
                  model: str, kind: Kind | None, parquet: Path | None = None) -> _Source:
    if traces and (db is not None or parquet is not None):
        raise UserError("give recorded traces (--traces) or a store (--db, --parquet), not both")
    if trials and not traces:
        raise UserError("--trials goes with the trace files they were recorded for "
                        "(--traces FILE), not with a store")
    if parquet is not None:
        src = _from_parquet(parquet, model, kind or Kind.cot)
        if db is not None:  # the policy is kept in the live store the export came from
            src.engine = store(db)
        return src
    if not traces:
        return _from_store(db, model, kind or Kind.cot)
    loaded = load_trace_files(traces, trials or ())
    data = loaded.data
    found = "sc" if isinstance(data[0], ObservedProgram) else "cot"
    if kind is not None and kind.value != found:
        raise UserError(f"--kind {kind.value}, but the trace files hold "
                        f"{KIND_NAMES[found]} records")
    if model != "*":
        data = [d for d in data if d.model == model]  # type: ignore[assignment]
        if not data:
            raise UserError(f"no records of model {model!r} in the trace files")
    names = ", ".join(p.name for p in traces + (trials or []))
    return _Source(data, names, "traces", notes=list(loaded.notes), traces=loaded)


def _from_store(db: str | None, model: str, kind: Kind) -> _Source:
    """The store's runs (or programs) of `model`: default store unless --db says otherwise."""
    engine = store(db, existing=True)
    url = engine.url.render_as_string()
    scope = None if model == "*" else model
    of_model = "" if scope is None else f" of model {model!r}"
    if kind is Kind.sc:
        programs = load_programs(engine, scope)
        return _Source(programs, f"store {url}: {len(programs)} programs",
                       f"self-consistency programs{of_model}", engine, recorded=url)
    return _runs_source(load_runs(engine, scope), f"store {url}", of_model, engine, url)


def _from_parquet(directory: Path, model: str, kind: Kind) -> _Source:
    """The runs (or programs) of a Parquet export (`dynasorctl export`), read with DuckDB."""
    from dynasorctl.calibration import parquet_source

    scope = None if model == "*" else model
    of_model = "" if scope is None else f" of model {model!r}"
    if kind is Kind.sc:
        programs = parquet_source.load_programs(directory, scope)
        return _Source(programs, f"parquet {directory}: {len(programs)} programs",
                       f"self-consistency programs{of_model}", recorded=str(directory))
    return _runs_source(parquet_source.load_runs(directory, scope), f"parquet {directory}",
                        of_model, None, str(directory))


def _runs_source(found: StoreRuns, where: str, of_model: str, engine: Engine | None,
                 recorded: str) -> _Source:
    src = _Source(found.runs, f"{where}: {len(found.runs)} probed requests, "
                  f"{found.labelled} labelled", f"probed requests{of_model}", engine,
                  traces=TraceData(found.runs, trials=found.trials),  # the trials it recorded
                  recorded=recorded)
    if found.text_dropped:
        src.notes.append(
            f"{len(found.runs) - found.with_text} of {len(found.runs)} requests were stored "
            "without their text (observe with --store-text to keep it): text signals are left "
            "out of every run, so learned rules decide on probe features alone")
    return src


def _recorded(src: _Source, recorded_interval: int) -> Recorded:
    """What the calibration data holds beyond probes, for the candidates and the policy."""
    runs = src.data
    return Recorded(
        interval=recorded_interval,
        text=bool(runs) and all(isinstance(r, ObservedRun) and r.text for r in runs),
        probe=src.traces.probe if src.traces is not None else None,
        trials=src.traces.trials if src.traces is not None else None)


def _check_enough(src: _Source, target: Target, alpha: float) -> None:
    """A store too small for the target fails with how many problems it needs."""
    assert src.recorded is not None
    problems = len({d.group for d in src.data})
    need = problems_needed(target, alpha)  # at least: as many when each problem has one record
    if problems < need:
        limit = min(value for _, _, value in limits(target))
        raise UserError(
            f"the store has {len(src.data)} {src.records} of {problems} problems (distinct "
            f"prompts); calibration needs at least {need} problems for a {pts(limit)}-point "
            f"target (half are held out to certify it): record more traffic into "
            f"{src.recorded}, point --db at another store, raise the "
            "target, or calibrate on recorded traces with --traces FILE")


def calibrate(
    traces: Annotated[list[Path] | None, typer.Option(
        "--traces", help="recorded trace file to calibrate on (repeatable)")] = None,
    trials: Annotated[list[Path] | None, typer.Option(
        "--trials", help="trials recorded for those traces (repeatable; joined by trace_id): "
        "adds the policies that take trials at transition words (DEER)")] = None,
    db: Annotated[str | None, typer.Option(
        "--db", help="calibrate on the observation store at this SQLAlchemy URL (the default "
        "without --traces: $DYNASOR_DB_URL, else ~/.local/share/dynasor/dynasor.db); the "
        "recommended policy is also stored there, inactive", show_default=False)] = None,
    parquet: Annotated[Path | None, typer.Option(
        "--parquet", help="calibrate on a Parquet export of the store (`dynasorctl export`), "
        "read with DuckDB: neither the live store nor all of the data in memory; with --db, "
        "the recommended policy is stored there", show_default=False)] = None,
    kind: Annotated[Kind | None, typer.Option(
        help="from the store: chain-of-thought requests (cot, the default) or "
        "self-consistency programs (sc)", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        help="write the recommended policy file (TOML) here")] = None,
    plot: Annotated[Path | None, typer.Option(help="also save the frontier plot as a PNG")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(
        help="target: 95% upper bound on the accuracy drop per new problem (answers lost "
        "minus answers gained), in percentage points; 0.5 when no target is set",
        show_default=False)] = None,
    max_answers_lost: Annotated[float | None, typer.Option(
        help="target: 95% upper bound on answers lost per new problem (gains not netted "
        "off), in percentage points", show_default=False)] = None,
    max_answer_change: Annotated[float | None, typer.Option(
        help="target: 95% upper bound on answers changed per new problem, in percentage "
        "points")] = None,
    model: Annotated[str, typer.Option(
        help='calibrate on this model\'s records only and scope the policy to it; "*": all')] = "*",
    seed: Annotated[int, typer.Option(help="seed of the split of problems into tune/holdout")] = 0,
    workers: Annotated[int, typer.Option(
        help="processes for the slow math-aware answer checks")] = min(2, os.cpu_count() or 1),
    cache_dir: Annotated[Path | None, typer.Option(
        help="where answer checks are cached between runs (default ~/.cache/dynasor)")] = None,
    note: Annotated[str | None, typer.Option(
        help="a note kept with the policy stored in the store")] = None,
) -> None:
    """Find the policy that saves the most compute with the damage bounded (95%), held out."""
    started = time.perf_counter()
    alpha = 0.05
    src = _observations(traces, trials, db, model, kind, parquet)
    data = src.data
    target = make_target(data, max_accuracy_drop, max_answer_change, max_answers_lost)
    if src.recorded is not None:
        _check_enough(src, target, alpha)
    check_reachable(data, target, seed, alpha)
    if not any(d.gold is not None for d in data):
        src.notes.append("no record has a gold answer: quality is measured as answers changed "
                         "against the unstopped run (import labels with `dynasorctl labels "
                         "import`)")
    for line in src.notes:
        console.print(f"[yellow]note:[/] {line}")
    cache = (cache_dir or default_cache_dir()) / "answer-checks.json"
    found = "sc" if isinstance(data[0], ObservedProgram) else "cot"
    with Grader(workers=max(1, workers), known=load_cache(cache)) as grader, _progress() as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        if found == "cot":
            recorded = probe_interval(data)  # type: ignore[arg-type]
            if recorded == 0:
                raise UserError(f"the {src.records} hold no probes: nothing to calibrate on")
            for _, schedule in SCHEDULES:
                check_schedule(CotPolicy(**schedule), recorded)
            progress("reading probes and text signals", 0, 1)
            table = build_table(data)  # type: ignore[arg-type]
            progress("reading probes and text signals", 1, 1)
            recorded = _recorded(src, recorded_interval=recorded)
            cal = calibrate_cot(Replayer(table), Grades(table, grader), [d.group for d in data],
                                target, seed, alpha, progress, recorded)
        else:
            cal = calibrate_sc(data, grader, target, seed, alpha, progress)  # type: ignore[arg-type]
    _keep(cache, grader)
    print_report(console, cal, target, found, time.perf_counter() - started)
    if plot is not None:
        save_png(cal, target, plot)
        console.print(f"plot written to {plot}")
    if cal.recommended is None:
        raise UserError(no_policy_message(cal, target))
    rec = cal.recommended
    console.print(f"[bold green]recommended:[/] {rec.candidate.name}: "
                  f"{pts(rec.holdout.net_saved)}% net saved held out; " + _damage_text(rec, target))
    chosen = rec.candidate.policy
    if found == "cot":
        chosen = with_recorded_probes(chosen, _recorded(src, probe_interval(data)))  # type: ignore[arg-type]
    policy = PolicyFile(kind=found, model=model, **{found: chosen},
                        provenance=provenance(cal, target, src.description, seed))
    if out is not None:
        write_policy_file(out, policy)
        console.print(f"policy written to {out}")
    if src.engine is not None:
        version = save_policy(src.engine, found, model, dump_policy_file(policy),
                              src.description, note)
        console.print(f"policy stored: {found} policy for model {model!r}, version {version} "
                      "(inactive)")


def _damage_text(e, target: Target) -> str:
    parts = [f"{r.name} {pts(r.share)} points (95% bound {pts(r.upper)} <= {pts(r.target)})"
             for r in target.risks(e.holdout)]
    d = e.holdout.damage
    if d.labelled_problems and target.max_answers_lost is None:
        parts.append(f"answers lost {pts(d.lost)} points (95% bound {pts(d.lost_upper)})")
    return "; ".join(parts)


def _summary_table(s: Summary, kind: str) -> Table:
    table = Table(title="Policy against the unstopped runs" if kind == "cot"
                  else "Policy against using every recorded sample")
    table.add_column("measure")
    table.add_column("value", justify="right")
    unit = "runs" if kind == "cot" else "programs"
    table.add_row(f"{unit} (in the policy's scope)", f"{s.runs} ({s.in_scope})")
    table.add_row("net compute saved", f"{pts(s.net_saved)}%")
    table.add_row(f"{unit} stopped early", f"{pts(s.stopped)}%")
    if s.sources:
        table.add_row("stopped at", ", ".join(f"{name} {s.sources[name]}" for name in
                                              ("probe", "trial", "text") if name in s.sources))
    if s.labelled:
        table.add_row("accuracy, full → policy",
                      f"{pts(s.accuracy_full)}% → {pts(s.accuracy_policy)}%")
        table.add_row("answers lost / gained", f"{s.lost} / {s.gained}")
    table.add_row("answers changed", str(s.changed))
    return table


def evaluate(
    traces: Annotated[Path, typer.Option("--traces", help="recorded trace file")],
    policy: Annotated[Path, typer.Option("--policy", help="policy file (TOML)")],
    out: Annotated[Path, typer.Option("--out", help="write one JSON decision a line here")],
    trials: Annotated[list[Path] | None, typer.Option(
        "--trials", help="trials recorded for the traces (repeatable; joined by trace_id)")
    ] = None,
    held_out: Annotated[bool, typer.Option(
        "--held-out", help="only the problems `calibrate --seed S` held out of these traces "
        "(S: --seed, else the policy's provenance seed): problems the calibration never saw")
    ] = False,
    seed: Annotated[int | None, typer.Option(
        help="with --held-out: the calibration's seed", show_default=False)] = None,
    workers: Annotated[int, typer.Option(
        help="processes for the slow math-aware answer checks")] = min(2, os.cpu_count() or 1),
    cache_dir: Annotated[Path | None, typer.Option(
        help="where answer checks are cached between runs (default ~/.cache/dynasor)")] = None,
) -> None:
    """Apply one policy to every record of a trace file, as the proxy would decide."""
    started = time.perf_counter()
    pf = read_policy_file(policy)
    loaded = load_trace_files([traces], trials or ())
    data = loaded.data
    kind = "sc" if isinstance(data[0], ObservedProgram) else "cot"
    if pf.kind != kind:
        raise UserError(f"{policy} is a {KIND_NAMES[pf.kind]} policy but {traces} holds "
                        f"{KIND_NAMES[kind]} records")
    for line in loaded.notes:
        console.print(f"[yellow]note:[/] {line}")
    if held_out:
        data = _held_out(data, pf, seed)
    cache = (cache_dir or default_cache_dir()) / "answer-checks.json"
    with Grader(workers=max(1, workers), known=load_cache(cache)) as grader, _progress() as bar:
        task = bar.add_task("applying the policy", total=len(data))

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if kind == "cot":
            decisions, summary = evaluate_cot(data, pf, grader, progress,  # type: ignore[arg-type]
                                              trials=loaded.trials)
        else:
            decisions, summary = evaluate_sc(data, pf, grader, progress)  # type: ignore[arg-type]
    try:
        with out.open("w", encoding="utf-8") as fh:
            for d in decisions:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UserError(f"{out}: cannot write decisions ({exc.strerror})") from exc
    _keep(cache, grader)
    console.print(_summary_table(summary, kind))
    if summary.in_scope == 0:
        console.print(f"[yellow]note:[/] the policy is scoped to model {pf.model!r}, "
                      "which no record in the file is from: nothing was stopped")
    console.print(f"{len(decisions)} decisions written to {out} "
                  f"({time.perf_counter() - started:.1f} s)")


def _held_out(data: list, pf: PolicyFile, seed: int | None) -> list:
    """The records of the problems a calibration with this seed held out of `data`."""
    if seed is None:
        recorded = pf.provenance.get("seed")
        if not isinstance(recorded, int) or isinstance(recorded, bool):
            raise UserError("--held-out needs the calibration's seed: the policy's provenance "
                            "has none, give --seed")
        seed = recorded
    tune = split_by_group([d.group for d in data], seed)
    kept = [d for d, t in zip(data, tune) if not t]
    if not kept:
        raise UserError("no problem is held out: the traces hold fewer than two problems")
    console.print(f"evaluating the {len({d.group for d in kept})} problems held out by seed "
                  f"{seed} ({len(kept)} of {len(data)} records)")
    return kept


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
    app.command("evaluate")(evaluate)
