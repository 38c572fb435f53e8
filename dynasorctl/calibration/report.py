"""Presenting a calibration: the frontier table, a terminal plot, an optional PNG."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from dynasorctl.calibration.search import Calibration, Evaluated, Target
from dynasorctl.errors import UserError


def pts(share: float | None) -> str:
    """A share as percentage points: 0.0123 -> '1.23'."""
    return "-" if share is None else f"{100 * share:.2f}"


def pct(share: float | None) -> str:
    """A share as a short percentage: 0.0123 -> '1.2'."""
    return "-" if share is None else f"{100 * share:.1f}"


def _damage(f, target: Target) -> tuple[float, float | None, str]:
    """(share, upper bound, label) of the first damage the target constrains."""
    risks = target.risks(f)
    if risks:
        return risks[0].share, risks[0].upper, risks[0].name
    return f.damage.changed, f.damage.changed_upper, "answers changed"


def _with_upper(share: float | None, upper: float | None) -> str:
    return "-" if share is None else f"{pct(share)} ({pct(upper)})"


def _shown(cal: Calibration) -> list[Evaluated]:
    return [e for e in cal.evaluated if e.holdout is not None]


def frontier_table(cal: Calibration, target: Target, kind: str) -> Table:
    unit = "programs" if kind == "sc" else "runs"
    table = Table(
        title=f"Pareto frontier of the tuning split, measured on the held-out split "
              f"({cal.holdout_runs} {unit} of {cal.holdout_problems} other problems)",
        caption="Percentages of tokens; damage in percentage points: a problem's share of its "
                f"{unit}, averaged over the held-out problems. (ub): 95% upper confidence bound "
                "over new problems (betting; the problem is the independent unit). lost ub if "
                f"{unit} indep.: Clopper-Pearson counting {unit} as independent, too tight when "
                f"{unit} of one problem fail together, for comparison only. drop: lost - gained. "
                "certified: passed fixed-sequence testing (95%, valid over every candidate "
                "searched).",
    )
    table.add_column("policy", no_wrap=True)
    table.add_column("net saved\ntune → held", justify="right")
    table.add_column("probe\ncost" if kind == "cot" else "samples\nused", justify="right")
    table.add_column("stopped", justify="right")
    table.add_column("changed\n(ub)", justify="right")
    table.add_column("lost /\ngained", justify="right")
    table.add_column("lost\n(ub)", justify="right")
    table.add_column("accuracy\ndrop (ub)", justify="right")
    table.add_column(f"lost ub if\n{unit} indep.", justify="right")
    table.add_column("accuracy\nfull → policy", justify="right")
    table.add_column("certi-\nfied", justify="center")
    for e in _shown(cal):
        h = e.holdout
        d = h.damage
        table.add_row(
            e.candidate.name + (" (previous best)" if e is cal.previous else "")
            + (" *" if e is cal.recommended else ""),
            f"{pct(e.tune.net_saved)} → {pct(h.net_saved)}",
            pct(h.probe_cost) if kind == "cot" else pct(h.samples_used),
            pct(h.stopped),
            _with_upper(d.changed, d.changed_upper),
            f"{h.lost} / {h.gained}" if h.labelled else "-",
            _with_upper(d.lost, d.lost_upper),
            _with_upper(d.drop, d.drop_upper),
            pct(d.lost_upper_runs) if h.labelled else "-",
            f"{pct(h.accuracy_full)} → {pct(h.accuracy_policy)}" if h.labelled else "-",
            "yes" if e.certified else ("no" if e.tested else "base"),
            style="bold green" if e is cal.recommended else None,
        )
    return table


def _plot_lines(series: list[tuple[str, list[float], list[float], str, bool]], title: str,
                xlabel: str, ylabel: str, width: int, height: int) -> str:
    """A colourless text plot through plotext (its 6.x object API, or the older functions)."""
    import plotext as plt

    if hasattr(plt, "scatter"):  # plotext 5
        plt.clf()
        plt.plotsize(width, height)
        for label, xs, ys, marker, lines in series:
            (plt.plot if lines else plt.scatter)(xs, ys, label=label, marker=marker)
        plt.title(title)
        plt.xlabel(xlabel)
        plt.ylabel(ylabel)
        return plt.uncolorize(plt.build())
    fig = plt.figure
    fig.clear()
    fig.plot_size(width, height)
    for label, xs, ys, marker, lines in series:
        signal = fig.signal(xs, ys, marker=marker)
        signal.label(label)
        if lines:
            signal.lines()
        fig.draw(signal)
    fig.title(title)
    fig.label(xlabel, axis="x")
    fig.label(ylabel, axis="y")
    return fig.build().string(colorless=True)


def terminal_plot(cal: Calibration, target: Target, width: int = 90, height: int = 20) -> str:
    """The frontier as text: held-out damage (x) against held-out net saved (y)."""
    shown = _shown(cal)
    if not shown:
        return ""
    tested = sorted((e for e in shown if e.tested), key=lambda e: _damage(e.holdout, target)[0])
    series = []
    if tested:
        series.append(("frontier (held out)", [100 * _damage(e.holdout, target)[0] for e in tested],
                       [100 * e.holdout.net_saved for e in tested], "dot", True))
    for e in shown:
        if not e.tested:
            series.append((e.candidate.name, [100 * _damage(e.holdout, target)[0]],
                           [100 * e.holdout.net_saved], "x", False))
    if cal.recommended is not None:
        r = cal.recommended.holdout
        series.append(("recommended", [100 * _damage(r, target)[0]], [100 * r.net_saved], "*",
                       False))
    label = _damage(shown[0].holdout, target)[2]
    return _plot_lines(series, "Savings against damage, held out", f"{label}, points",
                       "net saved, %", width, height)


def save_png(cal: Calibration, target: Target, path: Path) -> None:
    """The same plot as a PNG (matplotlib, imported only when asked for)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from exc
    shown = _shown(cal)
    fig, ax = plt.subplots(figsize=(8, 5))
    frontier = sorted((e for e in shown if e.tested), key=lambda e: _damage(e.holdout, target)[0])
    xs = [100 * _damage(e.holdout, target)[0] for e in frontier]
    ax.plot(xs, [100 * e.holdout.net_saved for e in frontier], "o-", label="frontier (held out)")
    ub = [100 * (_damage(e.holdout, target)[1] or 0) for e in frontier]
    ax.plot(ub, [100 * e.holdout.net_saved for e in frontier], ":", color="grey",
            label="95% upper bound on damage")
    for e in shown:
        if not e.tested:
            ax.plot(100 * _damage(e.holdout, target)[0], 100 * e.holdout.net_saved, "x",
                    color="black")
            ax.annotate(e.candidate.name, (100 * _damage(e.holdout, target)[0],
                                           100 * e.holdout.net_saved), fontsize=8)
    if cal.recommended is not None:
        r = cal.recommended.holdout
        ax.plot(100 * _damage(r, target)[0], 100 * r.net_saved, "*", markersize=14,
                color="green", label=f"recommended: {cal.recommended.candidate.name}")
    risks = target.risks(shown[0].holdout) if shown else []
    limit = risks[0].target if risks else None
    if limit is not None:
        ax.axvline(100 * limit, color="red", linestyle="--", linewidth=1, label="target")
    label = _damage(shown[0].holdout, target)[2] if shown else "damage"
    ax.set_xlabel(f"{label}, percentage points (held out)")
    ax.set_ylabel("net compute saved, %")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise UserError(f"{path}: cannot write the plot ({exc.strerror})") from exc
    finally:
        plt.close(fig)


def print_report(console: Console, cal: Calibration, target: Target, kind: str,
                 seconds: float) -> None:
    console.print(frontier_table(cal, target, kind))
    console.print(terminal_plot(cal, target, width=min(100, console.width)), markup=False)
    n = len(cal.evaluated)
    console.print(
        f"{n} candidate policies; tuned on {cal.tune_runs} {'programs' if kind == 'sc' else 'runs'}"
        f" ({cal.tune_problems} problems), tested on {cal.holdout_runs} "
        f"({cal.holdout_problems} other problems); {seconds:.1f} s."
    )
    console.print(
        "Bounds: 95% upper confidence bounds on the mean damage per new problem, from the "
        f"{cal.holdout_problems} held-out problems as independent draws (testing by betting, "
        "Waudby-Smith & Ramdas 2023; exact Clopper-Pearson where each problem has one record), "
        "tested in a fixed order so the guarantee covers every candidate searched.")
    if kind == "cot":
        console.print("Net saved = (main tokens not generated - probe cost) / main tokens of the "
                      "unstopped runs; a probe costs its decoded tokens + 8 tokens of prompt.")
    else:
        console.print("Net saved = (tokens of the samples not drawn - probe cost) / tokens of all "
                      "recorded samples.")
