"""Calibration on demand from the dashboard: what `dynasorctl calibrate --db` does, on the
store's newest probed requests, reduced to the frontier the panel shows.

The same steps as the command (its target defaults, its checks that the store is big
enough, `calibrate_cot` over the probe table, the policy stored as the next inactive
version with the same provenance); only the runs differ: the newest `max_runs` probed
requests without text (`savings.recent_runs`), so a large store stays a bounded read.
Errors are `UserError`s with the command's own one-line messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from dynasorctl.calibration.evaluate import check_schedule, probe_interval
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.metrics import Grades
from dynasorctl.calibration.policyfile import dump_policy_file
from dynasorctl.calibration.replay import Replayer
from dynasorctl.calibration.report import pts
from dynasorctl.calibration.search import SCHEDULES, Calibration, Target, calibrate_cot
from dynasorctl.calibration.store_source import save_policy
from dynasorctl.calibration.table import build_table
from dynasorctl.calibration.targets import (
    check_reachable,
    make_target,
    no_policy_message,
    problems_needed,
    provenance,
)
from dynasorctl.dashboard.savings import MAX_RUNS, StoredPolicy, recent_runs
from dynasorctl.errors import UserError
from proxy.core.policy import CotPolicy, PolicyFile
from proxy.store.models import PolicyRow

ALPHA = 0.05
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CalibrationSettings:
    """The command's defaults: a 0.5-point bound on answers lost (changed, unlabelled)."""

    max_accuracy_drop: float | None = 0.5  # percentage points, as --max-accuracy-drop
    max_answer_change: float | None = None
    seed: int = 0
    max_runs: int = MAX_RUNS
    store: bool = True  # keep the recommended policy in the store, inactive


@dataclass(frozen=True)
class FrontierPoint:
    """One policy of the tuning split's frontier, measured on the held-out split."""

    name: str
    net_saved: float
    changed: float  # share of held-out answers changed
    bound: float  # its 95% upper bound
    tested: bool
    certified: bool


@dataclass(frozen=True)
class CalibrationResult:
    runs: int
    holdout: int
    target: str  # for people: "≤0.50 pts answers changed"
    frontier: list[FrontierPoint]
    recommended: str | None  # the recommended candidate's name
    stored: StoredPolicy | None  # where it was stored
    message: str | None = None  # why nothing was recommended


def _target_text(target: Target) -> str:
    limits = [(name, getattr(target, attr, None)) for name, attr in (
        ("accuracy drop", "max_accuracy_drop"), ("answers lost", "max_answers_lost"),
        ("answers changed", "max_answer_change"))]
    return ", ".join(f"≤{pts(value)} pts {name}" for name, value in limits if value is not None)


def _changed_bound(f: Any) -> float:
    """The 95% bound on answers changed that calibration certified with.

    Per problem (`f.damage`) where calibration computes one, else per run (older
    figures carry it as `f.changed_upper`).
    """
    damage = getattr(f, "damage", None)
    if damage is not None and getattr(damage, "changed_upper", None) is not None:
        return float(damage.changed_upper)
    return float(f.changed_upper)


def _frontier(cal: Calibration) -> list[FrontierPoint]:
    return [FrontierPoint(e.candidate.name, e.holdout.net_saved, e.holdout.changed_share,
                          _changed_bound(e.holdout), e.tested, e.certified)
            for e in cal.frontier if e.holdout is not None]


def _store(engine: Engine, cal: Calibration, target: Target, source: str,
           seed: int) -> StoredPolicy:
    assert cal.recommended is not None
    policy = PolicyFile(kind="cot", model="*", cot=cal.recommended.candidate.policy,
                        provenance=provenance(cal, target, source, seed))
    text = dump_policy_file(policy)
    version = save_policy(engine, "cot", "*", text, source, note="calibrated from the dashboard")
    p = PolicyRow
    with engine.connect() as conn:
        policy_id = conn.scalar(select(p.id).where(p.kind == "cot", p.model == "*",
                                                   p.version == version))
    return StoredPolicy(int(policy_id), version, "*", text)


def run_calibration(engine: Engine, settings: CalibrationSettings = CalibrationSettings(),
                    progress: Progress | None = None) -> CalibrationResult:
    """Calibrate a chain-of-thought policy for every model on the store's newest runs."""
    runs = recent_runs(engine, settings.max_runs)
    if not runs:
        raise UserError("no probed chain-of-thought requests in the store: nothing to calibrate on")
    target = make_target(runs, settings.max_accuracy_drop, settings.max_answer_change)
    need = problems_needed(target, ALPHA)
    problems = len({r.group for r in runs})  # distinct prompts
    if problems < need:
        raise UserError(f"the store's newest {len(runs)} probed requests hold {problems} "
                        f"problems (distinct prompts); calibration needs at least {need} for "
                        "this target (half are held out to certify it): record more traffic, "
                        "or calibrate with `dynasorctl calibrate` and a looser target")
    check_reachable(runs, target, settings.seed, ALPHA)
    recorded = probe_interval(runs)
    if recorded == 0:
        raise UserError("the probed requests hold no probes: nothing to calibrate on")
    for _, schedule in SCHEDULES:
        check_schedule(CotPolicy(**schedule), recorded)
    table = build_table(runs)
    with Grader(workers=1) as grader:  # this worker thread; math-verify without signals
        cal = calibrate_cot(Replayer(table), Grades(table, grader), [r.group for r in runs],
                            target, settings.seed, ALPHA, progress)
    stored = message = None
    if cal.recommended is None:
        message = no_policy_message(cal, target)
    elif settings.store:
        source = (f"store {engine.url.render_as_string()}: newest {len(runs)} probed requests "
                  "(dashboard)")
        stored = _store(engine, cal, target, source, settings.seed)
    return CalibrationResult(len(runs), cal.holdout_runs, _target_text(target),
                             _frontier(cal),
                             cal.recommended.candidate.name if cal.recommended else None,
                             stored, message)
