"""`bench serve`'s report: per arm figures, as a table, JSON and a PNG plot."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dynasorctl.bench.serve.arms import ABLATIONS, ARMS, CellResult, Outcome
from dynasorctl.bench.serve.bench import Run
from dynasorctl.bench.serve.metrics import (
    TARGET,
    Summary,
    attainment,
    rate_at,
    scale_at,
    summarise,
)


@dataclass
class ArmFigures:
    name: str
    what: str
    attainment: dict[float, list[float]]  # rate -> attainment of each seed
    max_rate_at_90: float
    max_rate_bound: str  # "", ">=" (never fell below) or "<" (below even at the lowest rate)
    slo: dict[float, float]  # SLO scale -> attainment at the reference rate (seeds pooled)
    tightest_slo_at_90: float
    tightest_slo_bound: str
    at_reference: Summary
    scheduler_us_per_request: float
    peak_queued_programs: int
    simulated: dict[float, float] | None = None  # real runs: the simulator on the same cells

    def curve(self) -> dict[float, float]:
        return {rate: statistics.mean(v) for rate, v in self.attainment.items()}

    def simulated_gap(self) -> float | None:
        """The simulator's largest distance from the real curve, in attainment (0-1)."""
        if self.simulated is None:
            return None
        curve = self.curve()
        return max(abs(self.simulated[rate] - curve[rate]) for rate in curve)

    def simulated_rate_at_90(self) -> tuple[float, str] | None:
        if self.simulated is None:
            return None
        return rate_at(list(self.simulated), list(self.simulated.values()))


def reference_rate(run: Run, chosen: float | None) -> float:
    """The rate the latency and SLO-scale figures are read at (the middle one by default)."""
    rates = sorted(run.rates)
    return chosen if chosen in rates else rates[len(rates) // 2]


def figures(run: Run, reference: float) -> dict[str, ArmFigures]:
    s = run.settings
    by_arm: dict[str, dict[float, list[CellResult]]] = defaultdict(lambda: defaultdict(list))
    sim_by_arm: dict[str, dict[float, list[CellResult]]] = defaultdict(lambda: defaultdict(list))
    for i, (cell, result) in enumerate(zip(run.cells, run.results)):
        by_arm[cell.arm][cell.rate].append(result)
        if run.simulated:
            sim_by_arm[cell.arm][cell.rate].append(run.simulated[i])
    out = {}
    for name in s.arms:
        cells = by_arm[name]
        per_rate = {rate: [attainment(r.outcomes, run.base, s.slo_scale) for r in results]
                    for rate, results in sorted(cells.items())}
        curve = {rate: statistics.mean(v) for rate, v in per_rate.items()}
        max_rate, bound = rate_at(list(curve), list(curve.values()))
        pooled: list[Outcome] = [o for r in cells[reference] for o in r.outcomes]
        slo = {scale: attainment(pooled, run.base, scale) for scale in s.slo_scales}
        tightest, tight_bound = scale_at(list(slo), list(slo.values()))
        everything = [r for results in cells.values() for r in results]
        admitted = sum(r.admitted for r in everything)
        simulated = None
        if run.simulated:
            simulated = {rate: statistics.mean(attainment(r.outcomes, run.base, s.slo_scale)
                                               for r in results)
                         for rate, results in sorted(sim_by_arm[name].items())}
        out[name] = ArmFigures(
            name, ARMS[name].what, per_rate, max_rate, bound, slo, tightest, tight_bound,
            summarise(pooled),
            1e6 * sum(r.scheduler_seconds for r in everything) / max(1, admitted),
            max(r.peak_queued_programs for r in everything), simulated)
    return out


def _rate(value: float, bound: str) -> str:
    return f"{bound}{value:.3g}"


def _ratio(a: ArmFigures, b: ArmFigures | None) -> str:
    if b is None or b.max_rate_at_90 <= 0:
        return ""
    censored = "~" if a.max_rate_bound or b.max_rate_bound else ""
    return f"{censored}{a.max_rate_at_90 / b.max_rate_at_90:.2f}x"


def render(run: Run, figs: dict[str, ArmFigures], reference: float, mode: str) -> Group:
    s = run.settings
    rates = sorted(run.rates)
    head = Text(
        f"{mode}; capacity {s.capacity} sequences; {s.programs} programs a cell, {s.seeds} "
        f"seed(s); {s.sc_share:.0%} self-consistency; lengths x{s.length_scale:g}\n"
        f"deadline = SLO scale x difficulty (1-3) x base; base (mean unloaded latency): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in run.base.items())
        + f"; SLO scale {s.slo_scale:g} for the rate curve; figures below the curve at "
        f"{reference:g} programs/s")
    summary = Table(title=f"Highest rate at {TARGET:.0%} deadline attainment (SLO scale "
                    f"{s.slo_scale:g}), interpolated over the mean of seeds")
    for col in ("arm", "programs/s", "vs fcfs", "vs gang-stop", f"tightest SLO at {TARGET:.0%}"):
        summary.add_column(col, justify="left" if col == "arm" else "right")
    for f in figs.values():
        summary.add_row(f.name, _rate(f.max_rate_at_90, f.max_rate_bound),
                        _ratio(f, figs.get("fcfs")), _ratio(f, figs.get("gang-stop")),
                        f"{f.tightest_slo_bound}{f.tightest_slo_at_90:.2f}")
    curve = Table(title=f"Deadline attainment against rate (programs/s), SLO scale "
                  f"{s.slo_scale:g}, mean of seeds")
    curve.add_column("arm")
    for rate in rates:
        curve.add_column(f"{rate:g}", justify="right")
    for f in figs.values():
        c = f.curve()
        curve.add_row(f.name, *(f"{c[r]:.0%}" for r in rates))
        gap, simulated_rate = f.simulated_gap(), f.simulated_rate_at_90()
        if f.simulated is not None and gap is not None and simulated_rate is not None:
            curve.add_row(Text(f"  simulated (max gap {gap * 100:.0f} pts, 90% at "
                               f"{_rate(*simulated_rate)})", style="dim"),
                          *(Text(f"{f.simulated[r]:.0%}", style="dim") for r in rates))
    slo = Table(title=f"Attainment against SLO scale at {reference:g} programs/s")
    slo.add_column("arm")
    for scale in s.slo_scales:
        slo.add_column(f"{scale:g}", justify="right")
    for f in figs.values():
        slo.add_row(f.name, *(f"{v:.0%}" for v in f.slo.values()))
    detail = Table(title=f"Programs at {reference:g} programs/s (all seeds; tokens per "
                   "program; scheduler time per admitted request; most programs queued)")
    for col in ("arm", "done", "p50 s", "p99 s", "tokens", "probe tokens", "stopped",
                "accuracy", "sched. us/req", "peak queue"):
        detail.add_column(col, justify="left" if col == "arm" else "right")
    for f in figs.values():
        m = f.at_reference
        detail.add_row(f.name, f"{m.done}/{m.programs}", _seconds(m.p50), _seconds(m.p99),
                       f"{m.tokens:,.0f}", f"{m.probe_tokens:,.0f}", f"{m.stopped:.0%}",
                       f"{m.accuracy:.1%}", f"{f.scheduler_us_per_request:,.0f}",
                       f"{f.peak_queued_programs:,}")
    return Group(head, summary, curve, slo, detail)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def to_json(run: Run, figs: dict[str, ArmFigures], reference: float, mode: str
            ) -> dict[str, Any]:
    s = run.settings
    return {
        "mode": mode,
        "settings": {"capacity": s.capacity, "programs": s.programs, "seeds": s.seeds,
                     "rates": sorted(run.rates), "slo_scale": s.slo_scale,
                     "slo_scales": list(s.slo_scales), "sc_share": s.sc_share,
                     "length_scale": s.length_scale, "cost": asdict(s.cost),
                     "cache_block": s.cache_block,
                     "sc_policy": s.sc_policy.model_dump(), "cot_policy": s.cot_policy.model_dump(),
                     "reference_rate": reference},
        "base": run.base,
        "arms": {f.name: {
            "what": f.what,
            "max_rate_at_90": f.max_rate_at_90,
            "max_rate_bound": f.max_rate_bound,
            "attainment": {str(r): v for r, v in f.curve().items()},
            "attainment_by_seed": {str(r): v for r, v in f.attainment.items()},
            "simulated_attainment": None if f.simulated is None else {
                str(r): v for r, v in f.simulated.items()},
            "simulated_max_rate_at_90": _json_rate(f.simulated_rate_at_90()),
            "simulated_max_gap": f.simulated_gap(),
            "attainment_by_slo_scale": {str(k): v for k, v in f.slo.items()},
            "tightest_slo_at_90": f.tightest_slo_at_90,
            "tightest_slo_bound": f.tightest_slo_bound,
            "at_reference": asdict(f.at_reference),
            "scheduler_us_per_request": f.scheduler_us_per_request,
            "peak_queued_programs": f.peak_queued_programs,
        } for f in figs.values()},
    }


def _json_rate(rate: tuple[float, str] | None) -> dict[str, Any] | None:
    return None if rate is None else {"rate": rate[0], "bound": rate[1]}


def plot(run: Run, figs: dict[str, ArmFigures], reference: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for f in figs.values():
        c = f.curve()
        style = {"linestyle": ":", "marker": "."} if f.name in ABLATIONS else {"marker": "o"}
        (line,) = left.plot(list(c), list(c.values()), label=f.name, **style)
        if f.simulated is not None:
            left.plot(list(f.simulated), list(f.simulated.values()), linestyle="--",
                      color=line.get_color(), alpha=0.6)
        right.plot(list(f.slo), list(f.slo.values()), label=f.name, **style)
    for ax in (left, right):
        ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("deadline attainment")
        ax.grid(alpha=0.3)
    left.set_xlabel("program arrival rate (programs/s)")
    left.set_title(f"SLO scale {run.settings.slo_scale:g}"
                   + (" (dashed: simulator)" if run.simulated else ""))
    right.set_xlabel("SLO scale")
    right.set_title(f"at {reference:g} programs/s")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
