"""`dynasorctl bench store|rollout|calibrate-parquet`: dynasor past one machine, measured."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dynasorctl.commands.bench import bench_app
from dynasorctl.errors import UserError, err_console
from proxy.store.db import StoreError


def _say(line: str) -> None:
    err_console.print(line, style="dim")


def store(
    db: Annotated[list[str], typer.Option(
        "--db", help="Store to write into (repeatable; each measured in turn). Its requests "
        "table grows by what the writers write.")],
    writers: Annotated[int, typer.Option(min=1, help="Writer processes, as proxies.")] = 3,
    seconds: Annotated[float, typer.Option(min=1, help="Measured seconds.")] = 20,
) -> None:
    """Records/s the proxy's recorder sustains into a store, from several processes at once."""
    from dynasorctl.bench import store_bench

    table = Table(title=f"Store writes: {writers} recorder processes, {seconds:g} s")
    for col in ("store", "records written", "records/s", "write errors"):
        table.add_column(col, justify="left" if col == "store" else "right")
    for url in db:
        try:
            r = store_bench.run(url, writers, seconds)
        except (StoreError, RuntimeError) as exc:
            raise UserError(str(exc)) from exc
        shown = url.split("@")[-1] if "@" in url else url
        table.add_row(shown, f"{r.records:,}", f"{r.per_second:,.0f}", str(r.write_errors))
    Console().print(table)


def rollout(
    db: Annotated[str, typer.Option("--db", help="The store the proxies share (a scope "
                                    "'*' is written there, then killed).")],
    proxies: Annotated[int, typer.Option(min=1, help="Proxy processes on the store.")] = 3,
    repeats: Annotated[int, typer.Option(min=1, help="Kills timed.")] = 10,
) -> None:
    """Time from `rollout kill` committing to the last proxy enforcing nothing."""
    from dynasorctl.bench import scale_bench

    with tempfile.TemporaryDirectory() as tmp:
        try:
            p = scale_bench.propagation(db, proxies, repeats, Path(tmp), _say)
        except (StoreError, RuntimeError) as exc:
            raise UserError(str(exc)) from exc
    ms = sorted(s * 1000 for s in p.seconds)
    Console().print(f"rollout kill reached all {proxies} proxies in {p.median * 1000:.0f} ms "
                    f"(median of {repeats}; fastest {ms[0]:.0f} ms, slowest {ms[-1]:.0f} ms)")


def calibrate_parquet(
    requests: Annotated[int, typer.Option(min=1, help="Requests to seed the store with.")]
    = 1_000_000,
    keep: Annotated[Path | None, typer.Option(
        help="Work here and keep the store and its export (default: a temporary directory).")]
    = None,
) -> None:
    """Seed a store, export it to Parquet, calibrate from the Parquet: time and peak memory."""
    from dynasorctl.bench import scale_bench

    with tempfile.TemporaryDirectory() as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if (work / "store.db").exists():
            raise UserError(f"{work / 'store.db'} exists: the benchmark seeds a new store")
        r = scale_bench.calibrate_parquet(requests, work, [], _say)
    Console().print(r.output)
    Console().print(
        f"{r.requests:,} requests: seeded in {r.seed_s:.0f} s, exported in {r.export_s:.0f} s "
        f"({r.export_bytes / 1e6:.0f} MB of Parquet); calibrate --parquet took "
        f"{r.calibrate_s:.0f} s, peak memory {r.peak_rss_mb:,.0f} MB (largest process)")


def register(app: typer.Typer) -> None:
    """The commands join `dynasorctl bench` (registered by commands/bench.py)."""
    bench_app.command("store")(store)
    bench_app.command("rollout")(rollout)
    bench_app.command("calibrate-parquet")(calibrate_parquet)
