"""`dynasorctl bench`: measure the proxy's overhead (a script, not a timed test)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dynasorctl.errors import UserError, err_console

bench_app = typer.Typer(help="Benchmarks: what the proxy costs.", no_args_is_help=True)


class Generator(str, Enum):
    auto = "auto"
    wrk = "wrk"
    python = "python"


@bench_app.command()
def proxy(
    seconds: Annotated[
        int, typer.Option(help="Measured seconds of each cell (setup x workload).", min=1)
    ] = 10,
    warmup: Annotated[
        int, typer.Option(help="Unmeasured seconds of load before each cell.", min=0)
    ] = 2,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")
    ] = None,
    load_generator: Annotated[
        Generator,
        typer.Option(help="wrk (Debian's: scripts/bench-deps.sh installs it), python (slower, "
                     "labelled as such), or auto: wrk when installed."),
    ] = Generator.auto,
    probe_interval: Annotated[
        int, typer.Option(help="Tokens between probes when probing is on (dynasor's default is "
                          "64, which a 64-chunk stream reaches only at its end).", min=1)
    ] = 32,
    keep_awake: Annotated[
        bool, typer.Option("--keep-awake/--no-keep-awake",
                           help="Keep both cores busy at idle priority while measuring latency, so "
                           "a sleeping virtual core's wake-up time is not counted.")
    ] = True,
    burst: Annotated[
        bool, typer.Option("--burst/--step",
                           help="Fake upstream sends each stream in one burst of writes, instead "
                           "of yielding between chunks as an engine does.")
    ] = False,
    setup: Annotated[
        list[str] | None,
        typer.Option(help="Run only this setup (repeatable): direct, floor, relay, dynasor, "
                     "dynasor-probing.", show_default="all"),
    ] = None,
    repeat: Annotated[
        int, typer.Option(help="Run the whole comparison this many times and report the spread "
                          "(a shared machine's figures move from run to run).", min=1)
    ] = 1,
) -> None:
    """Direct vs. a minimal pass-through vs. dynasor observe (probing off, on), on loopback."""
    from dynasorctl.bench import load, proxy_bench, report

    chosen = setup or list(proxy_bench.SETUP_KEYS)
    unknown = sorted(set(chosen) - set(proxy_bench.SETUP_KEYS))
    if unknown:
        raise UserError(f"unknown setup {', '.join(unknown)}; "
                        f"choose from {', '.join(proxy_bench.SETUP_KEYS)}")
    if load_generator is Generator.wrk and load.wrk_path() is None:
        raise UserError("wrk is not installed: run scripts/bench-deps.sh, or pass "
                        "--load-generator python")
    generator = "python" if load_generator is Generator.python or (
        load_generator is Generator.auto and load.wrk_path() is None) else "wrk"
    if generator == "python":
        err_console.print("[yellow]wrk not used: the Python load generator saturates its own core "
                          "first, so capacity and streaming figures understate every setup[/]")
    runs = []
    for i in range(repeat):
        if repeat > 1:
            err_console.print(f"run {i + 1} of {repeat}", style="bold")
        try:
            result = proxy_bench.run(seconds, warmup, generator, chosen, probe_interval, keep_awake,
                                     burst, say=lambda line: err_console.print(line, style="dim"))
        except proxy_bench.BenchError as exc:
            raise UserError(str(exc)) from exc
        Console().print(report.render(result))
        runs.append(result)
    if repeat > 1:
        Console().print(report.spread(runs))
    if json_file is not None:
        data = report.to_json(runs[0]) if repeat == 1 else {"runs": [report.to_json(r) for r in runs]}
        json_file.write_text(json.dumps(data, indent=2) + "\n")
        err_console.print(f"figures written to {json_file}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command()
def dashboard(
    requests: Annotated[int, typer.Option(min=1, help="Requests to seed the store with.")] = 100_000,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each query.")] = 5,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="Also time a calibration (c) on the store.")] = True,
    keep: Annotated[Path | None, typer.Option(
        help="Seed the store here and keep it (default: a temporary directory).")] = None,
) -> None:
    """Every dashboard query timed on a seeded store (SQLite, migrated, indexed)."""
    import tempfile

    from rich.table import Table

    from dynasorctl.bench import dashboard_bench

    def say(line: str) -> None:
        err_console.print(line, style="dim")

    with tempfile.TemporaryDirectory() as tmp:
        path = keep or Path(tmp) / "bench.db"
        try:
            timings = dashboard_bench.run(path, requests, repeats, calibrate, say)
        except FileExistsError as exc:
            raise UserError(str(exc)) from exc
    table = Table(title=f"Dashboard queries on a store of {requests:,} requests "
                  f"(median and worst of {repeats})")
    for col in ("query", "rows", "median ms", "worst ms"):
        table.add_column(col, justify="left" if col == "query" else "right")
    for t in timings:
        table.add_row(t.query, f"{t.rows:,}", f"{t.median_ms:,.1f}", f"{t.max_ms:,.1f}")
    Console().print(table)


@bench_app.command()
def enforce(
    traces: Annotated[Path, typer.Option(
        "--traces", help="Trace file to send: chain-of-thought traces, or self-consistency programs "
        "for an sc policy.")],
    policy: Annotated[Path, typer.Option("--policy", help="Policy file to enforce (TOML).")],
    trials: Annotated[list[Path] | None, typer.Option(
        "--trials", help="Trials recorded for the traces (repeatable; joined by trace_id): the "
        "replay answers trials from them.")] = None,
    tokens_per_second: Annotated[float, typer.Option(
        min=0, help="Replay speed per stream (far above it, probes fall behind the stream).")] = 500.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Problems in flight at once.")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Send only the first N traces.")] = None,
) -> None:
    """Enforce a policy on every problem through the proxy; compare with `evaluate`'s prediction."""
    from rich.progress import Progress
    from rich.table import Table

    from dynasorctl.bench import enforce_bench
    from dynasorctl.calibration.evaluate import check_trials
    from dynasorctl.calibration.policyfile import read_policy_file
    from dynasorctl.traces import TraceFileError, load_cot, load_sc
    from dynasorctl.trials import load_trials

    pf = read_policy_file(policy)
    try:
        records = load_sc(traces) if pf.kind == "sc" else load_cot(traces)
        recorded = load_trials(trials) if trials else None
    except TraceFileError as exc:
        raise UserError(f"{exc} (the policy is a {pf.kind} policy)") from exc
    if recorded is not None and pf.kind == "sc":
        raise UserError("trial files go with chain-of-thought traces, not self-consistency "
                        "programs")
    records = records[:limit] if limit else records
    if pf.cot is not None:
        check_trials(pf.cot, recorded.setup if recorded is not None else None)
        missing = [t.trace_id for t in records  # type: ignore[union-attr]
                   if recorded is not None and t.trace_id not in recorded.by_trace]
        if missing:
            raise UserError(f"trace {missing[0]} has no trials in "
                            f"{', '.join(map(str, trials or []))} ({len(missing)} traces lack them)")
    console = Console()
    with Progress(console=console) as bar:
        task = bar.add_task("through the enforcing proxy", total=len(records))
        predicted, observed = enforce_bench.run(traces, records, policy, pf, tokens_per_second,
                                                concurrency, lambda: bar.advance(task), trials or ())
    what = "programs" if pf.kind == "sc" else "traces"
    table = Table(title=f"{policy.name} on {len(records)} {what} of {traces.name}")
    columns = ["", "evaluate (predicted)"]
    if predicted.replayed is not None:
        columns.append("evaluate, replay's positions")
    columns += ["through the proxy (observed)", "difference"]
    for col in columns:
        table.add_column(col, justify="right")
    rows = [("accuracy, full", "accuracy_full", "accuracy_full"),
            ("accuracy, policy", "accuracy_policy", "accuracy_policy"),
            ("stopped", "stopped", "stopped")]
    if observed.net_saved_at_stops is not None:
        rows.append(("net saved at the stops", "net_saved", "net_saved_at_stops"))
    rows.append(("net saved", "net_saved", "net_saved"))
    for name, field_, seen in rows:
        want, got = getattr(predicted.evaluate, field_), getattr(observed, seen)
        if want is None:
            continue
        cells = [name, f"{want:.1%}"]
        if predicted.replayed is not None:
            cells.append(f"{getattr(predicted.replayed, field_):.1%}")
        cells += [f"{got:.1%}", f"{(got - want) * 100:+.1f} pts"]
        table.add_row(*cells)
    console.print(table)
    console.print(f"probes sent by the proxy: {observed.probes:,} ({observed.probe_tokens:,} tokens decoded)")
    if observed.sources:
        console.print("stops by source: " + ", ".join(f"{k} {v}" for k, v in sorted(observed.sources.items())))
    if observed.as_predicted is not None:
        where = " at the replay's positions" if predicted.replayed is not None else ""
        console.print(f"decisions as predicted{where} (stop token and source): "
                      f"{observed.as_predicted} of {observed.runs}")
    if observed.net_saved_at_stops is not None:
        console.print("net saved at the stops: had the upstream stopped at each decision; net "
                      "saved: by the tokens it generated, the proxy's reaction time (a probe or "
                      "trial out, a busy machine) included")


@bench_app.command()
def serve(
    simulate: Annotated[bool, typer.Option(
        "--simulate", help="Run on the simulated engine (step cost model) instead of vLLM.")] = False,
    paper_scale: Annotated[bool, typer.Option(
        "--paper-scale", help="Simulate the paper's scale: real trace lengths, an A100-class "
        "GPU, capacity 128, 2,000 programs a cell (implies --simulate).")] = False,
    arms: Annotated[str | None, typer.Option(
        help="Arms, comma-separated (default: fcfs,fcfs-stop,gang-stop,dynasor).")] = None,
    ablations: Annotated[bool, typer.Option(
        "--ablations", help="Also run the ablations (dynasor less one part).")] = False,
    rates: Annotated[str | None, typer.Option(
        help="Program arrival rates (programs/s), comma-separated (default: from a quarter to "
        "2.5 times the plain engine's saturation).")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Arrival traces per rate.")] = None,
    programs: Annotated[int | None, typer.Option(min=2, help="Programs per arrival trace.")] = None,
    slo_scale: Annotated[float, typer.Option(
        min=0.01, help="SLO scale of the attainment-against-rate curve.")] = 3.0,
    slo_scales: Annotated[str, typer.Option(
        help="SLO scales of the attainment-against-SLO curve.")] = "1,1.5,2,3,4",
    sc_share: Annotated[float, typer.Option(
        help="Share of programs that are self-consistency (the rest chain of thought).")] = 0.5,
    length_scale: Annotated[float | None, typer.Option(
        min=1e-4, help="Recorded lengths times this (default 1/32; 1 at paper scale).")] = None,
    capacity: Annotated[int | None, typer.Option(
        min=1, help="Requests in the engine at once (its max_num_seqs).")] = None,
    cost: Annotated[str | None, typer.Option(
        help="Simulated step cost: fixed,per_seq,per_prefill,per_context seconds.")] = None,
    sc_policy: Annotated[Path | None, typer.Option(help="Self-consistency policy file.")] = None,
    cot_policy: Annotated[Path | None, typer.Option(help="Chain-of-thought policy file.")] = None,
    sc_traces: Annotated[Path | None, typer.Option(help="Self-consistency programs.")] = None,
    cot_traces: Annotated[Path | None, typer.Option(help="Chain-of-thought traces.")] = None,
    model: Annotated[Path | None, typer.Option(help="Model directory for the real engine.")] = None,
    engine_python: Annotated[Path | None, typer.Option(
        help="Python of the engine's environment (default .venv-engine).")] = None,
    reference_rate: Annotated[float | None, typer.Option(
        help="Rate of the latency and SLO-scale figures (default: the middle rate).")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot here.")] = None,
    fit_cost: Annotated[int, typer.Option(
        min=0, help="Only measure the real engine's step cost (this many repeats) and fit "
        "the simulator's constants.")] = 0,
) -> None:
    """Serve recorded programs open-loop: fcfs, fcfs-stop, gang-stop and dynasor's scheduler."""
    from dynasorctl.bench.serve.command import Options, run

    if output not in ("table", "json"):
        raise UserError(f"--format must be table or json, not {output!r}")
    run(Options(simulate, paper_scale, arms, ablations, rates, seeds, programs, slo_scale,
                slo_scales, sc_share, length_scale, capacity, cost, sc_policy, cot_policy,
                sc_traces, cot_traces, model, engine_python, reference_rate, output, plot,
                fit_cost))
