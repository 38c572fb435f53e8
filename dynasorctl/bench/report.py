"""The proxy benchmark's figures as rich tables and as JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from statistics import median
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dynasorctl.bench.fake_upstream import STREAM_TOKENS
from dynasorctl.bench.proxy_bench import (
    LOAD_BOUND,
    REFERENCE,
    SETUPS,
    WORKLOADS,
    Bench,
    Figures,
    Target,
    figures,
    targets,
)


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _bound(load_bound: bool) -> str:
    return "*" if load_bound else ""


def caption(bench: Bench, figs: dict[str, Figures]) -> str:
    """How the figures were taken, in the words the table's labels use."""
    parts = [
        (f"{escape(bench.load_generator)}, {bench.seconds} s a cell after {bench.warmup} s of "
         f"warm-up; {placement(bench)}."),
        "@N: N requests in flight. CPU: the server under test's utime+stime per request.",
        ("Latency taken with idle-priority busy loops keeping both cores awake (an idle virtual "
         "core can take milliseconds to wake)." if bench.keep_awake else
         "Latency taken with idle cores left to sleep."),
        (f"Streams: {STREAM_TOKENS} token chunks, "
         + ("each stream sent in one burst." if bench.burst else
            "the upstream yields between chunks, as an engine steps.")),
        f"Probing on: a probe every {bench.probe_interval} tokens.",
    ]
    disturbed = foreign_load(bench)
    if disturbed:
        parts.append(f"[yellow]Other processes on this machine took up to {disturbed[0]:.0%} of "
                     f"the server core and {disturbed[1]:.0%} of the load core during a run "
                     f"(row 'other processes' CPU': the most of either core in a setup's runs): "
                     f"those figures are disturbed.[/]")
    if any(f.capacity_load_bound or f.stream_load_bound for f in figs.values()):
        parts.append(f"[yellow]*: the load core was over {LOAD_BOUND:.0%} busy, so the setup may "
                     "go faster than shown.[/]")
    parts.append("target: the issue's, for dynasor with probing off; reported, not asserted.")
    return " ".join(parts)


def foreign_load(bench: Bench, threshold: float = 0.05) -> tuple[float, float] | None:
    """The most CPU other processes took of (server core, load core) in one cell, if notable."""
    server = max((c.server_core_foreign or 0.0 for c in bench.cells), default=0.0)
    load = max((c.load_core_foreign or 0.0 for c in bench.cells), default=0.0)
    return (server, load) if max(server, load) >= threshold else None


def _foreign(bench: Bench, setup: str) -> float | None:
    """The most of either core that other processes took during one of `setup`'s runs."""
    shares = [s for c in bench.cells if c.setup == setup
              for s in (c.server_core_foreign, c.load_core_foreign) if s is not None]
    return max(shares) if shares else None


def placement(bench: Bench) -> str:
    if bench.server_core is None:
        return "unpinned (fewer than 2 cores available)"
    return (f"server under test on core {bench.server_core}; load generator and the upstream "
            f"behind a proxy on core {bench.load_core}")


SHORT = {"direct": "direct", "floor": "floor", "relay": "relay\nonly",
         "dynasor": "dynasor\nprobe off",
         "dynasor-probing": "dynasor\nprobe on"}


def render(bench: Bench) -> Group:
    """The figures (a column per setup), the issue's reference figures, the probes' traffic."""
    figs = figures(bench)
    goals = {t.key: t for t in targets(figs)}
    table = Table(title="Proxy overhead against a fake upstream on loopback", caption_justify="left",
                  caption=caption(bench, figs))
    table.add_column("", no_wrap=True)
    for key in bench.setups:
        table.add_column(SHORT[key], justify="right", style="bold" if key == "dynasor" else None)
    table.add_column("target", justify="right")

    def row(label: str, fmt: Callable[[Figures], str], target: Target | None = None) -> None:
        cells = [fmt(figs[key]) for key in bench.setups]
        if target is not None and target.met is not None and "dynasor" in bench.setups:
            i = bench.setups.index("dynasor")
            cells[i] = f"[{'green' if target.met else 'red'}]{cells[i]}[/]"
        table.add_row(label, *cells, target.goal if target else "")

    row("p50 ms @1", lambda f: _num(f.p50_ms))
    row("p99 ms @1", lambda f: _num(f.p99_ms))
    row("added p50 ms @1", lambda f: _num(f.added_p50_ms), goals["added_p50_ms"])
    row("added p99 ms @1", lambda f: _num(f.added_p99_ms))
    table.add_section()
    row("req/s @64", lambda f: _num(f.capacity_rps, "{:,.0f}") + _bound(f.capacity_load_bound))
    row("CPU ms/req @64", lambda f: _num(f.cpu_ms_per_request))
    table.add_section()
    row(f"streams/s @16 ({STREAM_TOKENS} ch)",
        lambda f: _num(f.stream_rps, "{:,.0f}") + _bound(f.stream_load_bound))
    row("  share of direct", lambda f: _share(f.stream_share), goals["stream_share"])
    row("  share of floor", lambda f: _share(f.floor_share), goals["floor_share"])
    row("CPU ms/stream @16", lambda f: _num(f.cpu_ms_per_stream), goals["cpu_ms_per_stream"])
    row("probes upstream @16", lambda f: _num(f.probe_requests, "{:,}"))
    table.add_section()
    row("failed requests", lambda f: str(f.errors))
    foreign = {key: _foreign(bench, key) for key in bench.setups}
    table.add_row("other processes' CPU", *(_share(foreign[k]) for k in bench.setups), "")

    ref = Table(title="Beside the issue's reference figures")
    ref.add_column("proxy")
    ref.add_column("added p50 ms", justify="right")
    ref.add_column("streaming, share of direct", justify="right")
    for name, added_ms, share in REFERENCE:
        ref.add_row(name, f"{added_ms:.1f}", _share(share), style="dim")
    for key in ("floor", "dynasor"):
        if key in figs:
            ref.add_row(f"this run: {SHORT[key].replace(chr(10), ', ')}",
                        _num(figs[key].added_p50_ms, "{:.2f}"), _share(figs[key].stream_share))
    return Group(table, Text(""), ref, Text(""), Text.from_markup(probe_note(bench)))


SPREAD = (("stream_share", "streaming, share of direct", _share),
          ("floor_share", "streaming, share of the floor", _share),
          ("cpu_ms_per_stream", "CPU ms a stream", _num),
          ("added_p50_ms", "added p50 ms", _num))


def spread(benches: list[Bench]) -> Table:
    """Each setup's key figures over repeated runs: median, and the lowest and highest."""
    figs = [figures(b) for b in benches]
    setups = [k for k in benches[0].setups if k != "direct"]
    table = Table(title=f"Over {len(benches)} runs: median [lowest - highest]")
    table.add_column("")
    for key in setups:
        table.add_column(SHORT[key].replace(chr(10), ", "), justify="right")
    for field, label, fmt in SPREAD:
        cells = []
        for key in setups:
            values = sorted(v for f in figs if (v := getattr(f[key], field)) is not None)
            cells.append("-" if not values else
                         f"{fmt(median(values))} [{fmt(values[0])} - {fmt(values[-1])}]")
        table.add_row(label, *cells)
    disturbed = [d for b in benches if (d := foreign_load(b))]
    if disturbed:
        table.caption = (f"Other processes took up to {max(max(d) for d in disturbed):.0%} of a core "
                         f"during {len(disturbed)} of the runs.")
    return table


def probe_note(bench: Bench) -> str:
    """The probes' own upstream traffic during the streaming run."""
    cell = bench.cell("dynasor-probing", "streaming")
    if cell is None:
        return "probes: not measured (the dynasor-probing setup was not run)"
    streams, probes = cell.upstream.get("streams", 0), cell.upstream.get("probes", 0)
    outcomes = ", ".join(f"{k.removeprefix('probes_')} {v:,}" for k, v in sorted(cell.proxy.items())
                         if k.startswith("probes_")) or "none"
    per = f" ({probes / streams:.2f} a stream)" if streams else ""
    return (f"[bold]probes[/] (dynasor, probing on, streaming run): the upstream answered "
            f"{probes:,} probe requests beside {streams:,} streams{per}; "
            f"outcomes at the proxy: {outcomes}.")


def to_json(bench: Bench) -> dict[str, Any]:
    """Every figure and every raw cell, for `--json`."""
    figs = figures(bench)
    return {
        "load_generator": bench.load_generator,
        "seconds_per_cell": bench.seconds,
        "warmup_s": bench.warmup,
        "probe_interval": bench.probe_interval,
        "keep_awake": bench.keep_awake,
        "burst_streams": bench.burst,
        "server_core": bench.server_core,
        "load_core": bench.load_core,
        "stream_chunks": STREAM_TOKENS,
        "workloads": {w.key: {"label": w.label, "stream": w.stream, "concurrency": w.concurrency}
                      for w in WORKLOADS},
        "setups": {
            key: {
                "label": next(s.label for s in SETUPS if s.key == key),
                "figures": asdict(figs[key]),
                "cells": {
                    c.workload: {**asdict(c.load), "rps": c.load.rps, "cpu_s": c.cpu_s,
                                 "cpu_ms_per_request": c.cpu_ms_per_request,
                                 "upstream_cpu_s": c.upstream_cpu_s, "upstream": c.upstream,
                                 "proxy": c.proxy, "server_core_busy": c.server_core_busy,
                                 "load_core_busy": c.load_core_busy, "load_bound": c.load_bound,
                                 "server_core_foreign": c.server_core_foreign,
                                 "load_core_foreign": c.load_core_foreign}
                    for c in bench.cells if c.setup == key
                },
            }
            for key in bench.setups
        },
        "targets": [asdict(t) for t in targets(figs)],
        "reference": [{"name": n, "added_p50_ms": a, "stream_share": s} for n, a, s in REFERENCE],
    }
