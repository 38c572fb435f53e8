"""The body of `dynasorctl bench serve`: options in, settings, the run, the report out."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dynasorctl.bench.serve import bench, overhead, report
from dynasorctl.bench.serve.arms import ABLATIONS, ARMS, MAIN_ARMS, CellResult
from dynasorctl.bench.serve.fit import fit, points
from dynasorctl.bench.serve.sim import (
    A100,
    A100_CACHE_BLOCK,
    A100_CAPACITY,
    CPU,
    CPU_CACHE_BLOCK,
    CPU_CAPACITY,
    StepCost,
)
from dynasorctl.errors import UserError, err_console
from dynasorctl.traces import PACKAGED_SAMPLE, PACKAGED_SC_SAMPLE, TraceFileError, load_cot, load_sc
from proxy.core.policy import CotPolicy, PolicyFileError, ScPolicy, load_policy_file

# The policies `bench serve` enforces unless told otherwise (README, "What the real traces
# support"): self-consistency "certaindex >= 0.5, at least 2 samples" (no majority answer lost
# on sc-dev) and chain-of-thought `w12@256` (certified at 5 points on cot-dev).
SC_POLICY = ScPolicy(threshold=0.5, min_samples=2, max_samples=8)
COT_POLICY = CotPolicy(interval=256, window=12)
SHARED_TRACES = Path("/work/shared/data/traces")


@dataclass(frozen=True)
class Options:
    simulate: bool
    paper_scale: bool
    arms: str | None
    ablations: bool
    rates: str | None
    seeds: int | None
    programs: int | None
    slo_scale: float
    slo_scales: str
    sc_share: float
    length_scale: float | None
    capacity: int | None
    cost: str | None
    sc_policy: Path | None
    cot_policy: Path | None
    sc_traces: Path | None
    cot_traces: Path | None
    model: Path | None
    engine_python: Path | None
    reference_rate: float | None
    output: str
    plot: Path | None
    fit_cost: int


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise UserError(f"{what}: expected numbers separated by commas, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{what}: expected positive numbers, got {text!r}")
    return values


def _traces(given: Path | None, name: str, packaged: Path) -> Path:
    if given is not None:
        return given
    for folder in filter(None, (os.environ.get("DYNASOR_TRACES"), SHARED_TRACES)):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return packaged


def _policy(path: Path | None, kind: str) -> CotPolicy | ScPolicy:
    if path is None:
        return SC_POLICY if kind == "sc" else COT_POLICY
    try:
        pf = load_policy_file(path)
    except PolicyFileError as exc:
        raise UserError(str(exc)) from exc
    if pf.kind != kind:
        raise UserError(f"{path}: a {pf.kind} policy, not a {kind} one")
    policy = pf.sc if kind == "sc" else pf.cot
    assert policy is not None
    return policy


def settings(o: Options) -> bench.Settings:
    simulate = o.simulate or o.paper_scale
    arms = tuple(a.strip() for a in o.arms.split(",")) if o.arms else MAIN_ARMS
    arms += tuple(a for a in ABLATIONS if o.ablations and a not in arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if not 0 <= o.sc_share <= 1:
        raise UserError("--sc-share must be between 0 and 1")
    cost = A100 if o.paper_scale else CPU
    if o.cost:
        values = o.cost.split(",")
        try:
            cost = StepCost(*(float(v) for v in values), name="given")  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise UserError("--cost: four numbers: fixed,per_seq,per_prefill,per_context "
                            f"seconds, got {o.cost!r}") from exc
    default_programs = 2000 if o.paper_scale else 200 if simulate else 40
    sc_policy, cot_policy = _policy(o.sc_policy, "sc"), _policy(o.cot_policy, "cot")
    assert isinstance(sc_policy, ScPolicy) and isinstance(cot_policy, CotPolicy)
    return bench.Settings(
        arms=arms, rates=_floats(o.rates, "--rates") if o.rates else (),
        seeds=o.seeds or (3 if simulate else 2), programs=o.programs or default_programs,
        slo_scale=o.slo_scale, slo_scales=_floats(o.slo_scales, "--slo-scales"),
        sc_share=o.sc_share, length_scale=o.length_scale or (1.0 if o.paper_scale else 1 / 32),
        max_tokens=32768 if o.paper_scale else 1024,
        capacity=o.capacity or (A100_CAPACITY if o.paper_scale else CPU_CAPACITY), cost=cost,
        cache_block=A100_CACHE_BLOCK if o.paper_scale else CPU_CACHE_BLOCK,
        sc_policy=sc_policy, cot_policy=cot_policy, simulate=simulate, model=o.model,
        engine_python=o.engine_python)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err_console, transient=True)


def run(o: Options) -> None:
    s = settings(o)
    if o.fit_cost:
        return _fit(s, o.fit_cost)
    sc_path = _traces(o.sc_traces, "sc-dev.jsonl.gz", PACKAGED_SC_SAMPLE)
    cot_path = _traces(o.cot_traces, "cot-dev.jsonl.gz", PACKAGED_SAMPLE)
    try:
        sc_records = load_sc(sc_path) if s.sc_share > 0 else []
        cot_records = load_cot(cot_path) if s.sc_share < 1 else []
    except TraceFileError as exc:
        raise UserError(str(exc)) from exc
    err_console.print(f"traces: {sc_path if sc_records else '-'} (self-consistency), "
                      f"{cot_path if cot_records else '-'} (chain of thought)", style="dim")
    from dynasorctl.calibration.grading import Grader

    with Grader() as grader:
        templates = bench.build_templates(s, sc_records, cot_records, grader.same)
    templates = {k: v for k, v in templates.items() if v}
    try:
        with _progress() as bar:
            if s.simulate:
                planned = bench.plan(s, templates)
                task = bar.add_task("simulating", total=len(planned.cells))
                planned.results = bench.simulate(planned, lambda: bar.advance(task))
            else:
                planned = _on_engine(s, templates, o.cost is None, bar)
    except bench.BenchError as exc:
        raise UserError(str(exc)) from exc
    s = planned.settings
    mode = (f"simulated ({s.cost.name or 'given step cost'})" if s.simulate
            else f"real engine (vLLM in process); simulator beside it: {_cost(s.cost)}")
    reference = report.reference_rate(planned, o.reference_rate)
    figs = report.figures(planned, reference)
    cost = overhead.measure() if s.simulate else None
    if o.output == "json":
        data = report.to_json(planned, figs, reference, mode)
        if cost is not None:
            data["overhead"] = asdict(cost)
        print(json.dumps(data, indent=2))
    else:
        console = Console()
        console.print(report.render(planned, figs, reference, mode))
        if cost is not None:
            console.print(f"program scheduler overhead with {cost.queued_programs:,} programs "
                          f"queued: {cost.us_per_request:,.0f} us (CPU) per admitted request in all "
                          f"({cost.admit_us_per_request:,.0f} us of it deciding admission; "
                          f"{cost.calls:,} calls for {cost.admitted:,} requests, progress "
                          "reported every token)")
    if o.plot is not None:
        try:
            report.plot(planned, figs, reference, o.plot)
        except ImportError as exc:
            raise UserError("--plot needs matplotlib (pip install 'dynasor[dev]')") from exc
        err_console.print(f"plot written to {o.plot}")


def _on_engine(s: bench.Settings, templates: dict, fit_first: bool, bar: Progress
               ) -> bench.Run:
    """The cells on the engine, after timing its steps in the same session (unless a cost is
    given): rates, deadlines' base and the simulator beside the run all come from that, since
    other load on a shared machine changes the engine's speed from one hour to the next."""
    repeats = 1 if fit_first else 0
    task = bar.add_task("timing the engine's steps, then programs", total=points(repeats))

    def plan_cells(samples: list[list[float]]) -> bench.Run:
        settings = s
        if samples:
            cost, error = fit([tuple(x) for x in samples], "fitted in this run")  # type: ignore[misc]
            settings = replace(s, cost=cost)
            err_console.print(f"{_cost(cost)}; median error {error:.0%} over {len(samples)} "
                              "measurements", style="dim")
        planned = bench.plan(settings, templates)
        err_console.print(f"{len(planned.cells)} cells at "
                          + ", ".join(f"{r:g}" for r in planned.rates) + " programs/s; base "
                          + ", ".join(f"{k} {v:.2f} s" for k, v in planned.base.items()),
                          style="dim")
        bar.update(task, total=points(repeats) + sum(len(c.programs) for c in planned.cells))
        return planned

    def on_cell(cell: bench.Cell, result: CellResult) -> None:
        done = sum(o.finish is not None for o in result.outcomes)
        err_console.print(f"{cell.arm} at {cell.rate:g} programs/s, seed {cell.seed}: "
                          f"{done}/{len(result.outcomes)} programs done", style="dim")

    planned, _ = bench.on_engine(s, repeats, plan_cells, lambda: bar.advance(task),
                                 on_cell=on_cell)
    planned.simulated = bench.simulate(planned, lambda: None)
    return planned


def _cost(cost: StepCost) -> str:
    return (f"step = {cost.fixed * 1000:.1f} ms + {cost.per_seq * 1000:.2f} ms x running + "
            f"{cost.per_prefill * 1000:.2f} ms x prefilled + {cost.per_context * 1e6:.2f} us x "
            f"context tokens ({cost.name})")


def _fit(s: bench.Settings, repeats: int) -> None:
    with _progress() as bar:
        task = bar.add_task("timing the engine's steps", total=points(repeats))
        try:
            _, samples = bench.on_engine(
                s, repeats, lambda _: bench.Run(s, {}, (), []), lambda: bar.advance(task),
                on_sample=lambda x: err_console.print(
                    f"step {x[0] * 1000:.1f} ms: {x[1]} running, {x[2]} prefilled, "
                    f"{x[3]} context tokens", style="dim"))
        except bench.BenchError as exc:
            raise UserError(str(exc)) from exc
    cost, error = fit([tuple(x) for x in samples], "fitted")  # type: ignore[misc]
    Console().print(f"{_cost(cost)}; median error {error:.0%} over {len(samples)} measurements\n"
                    f"--cost {cost.fixed:.4g},{cost.per_seq:.4g},{cost.per_prefill:.4g},"
                    f"{cost.per_context:.4g}")
