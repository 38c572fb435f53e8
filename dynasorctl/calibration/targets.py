"""Calibration targets: what the operator bounds, what a held-out sample can certify, and
what is said about it. Shared by `dynasorctl calibrate` and the dashboard's calibration, so
both check, recommend and record a policy the same way.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from dynasorctl.calibration.damage import least_upper
from dynasorctl.calibration.report import pts
from dynasorctl.calibration.search import Calibration, Target, split_by_group
from dynasorctl.errors import UserError


def share(points: float | None, option: str) -> float | None:
    if points is None:
        return None
    if not 0 < points < 100:
        raise UserError(f"{option} is in percentage points and must be between 0 and 100, "
                        f"not {points:g}")
    return points / 100


DEFAULT_MAX_ACCURACY_DROP = 0.005  # the target: half a point

def limits(target: Target) -> list[tuple[str, str, float]]:
    """(option, measure, share) of each constrained measure."""
    return [(option, name, value) for option, name, value in (
        ("--max-accuracy-drop", "accuracy drop", target.max_accuracy_drop),
        ("--max-answers-lost", "answers lost", target.max_answers_lost),
        ("--max-answer-change", "answers changed", target.max_answer_change),
    ) if value is not None]


def problems_needed(target: Target, alpha: float, one_record_each: bool = True,
            most: int = 200_000) -> int:
    """Fewest problems whose held-out half could meet every target with nothing damaged.

    Held-out problems, not records, are what the bounds count; `most`: give up above it.
    """
    held = 1
    for _, name, limit in limits(target):
        if least_upper(held, name, one_record_each, alpha) <= limit:
            continue
        lo, hi = held, held * 2  # the bound falls as problems are added: search by doubling
        while hi <= most and least_upper(hi, name, one_record_each, alpha) > limit:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if least_upper(mid, name, one_record_each, alpha) <= limit \
                else (mid, hi)
        held = hi
    return 2 * held


def make_target(data: list, max_accuracy_drop: float | None, max_answer_change: float | None,
            max_answers_lost: float | None = None) -> Target:
    drop = share(max_accuracy_drop, "--max-accuracy-drop")
    change = share(max_answer_change, "--max-answer-change")
    lost = share(max_answers_lost, "--max-answers-lost")
    if drop is None and change is None and lost is None:
        drop = DEFAULT_MAX_ACCURACY_DROP
    labelled = any((d.gold is not None) for d in data)
    if not labelled:  # without labels, quality is measured as answers changed
        tightest = min((v for v in (drop, lost) if v is not None), default=None)
        change, drop, lost = (change if change is not None else tightest), None, None
    return Target(drop, change, lost)


def check_reachable(data: list, target: Target, seed: int, alpha: float) -> None:
    """Fail fast when even a policy that changes no answer could not be certified."""
    held = ~split_by_group([d.group for d in data], seed)
    if not held.any():
        raise UserError("too few problems to hold any out: calibration needs at least two")
    for option, name, value in limits(target):
        kept = [d for d, h in zip(data, held) if h and (name == "answers changed"
                                                        or d.gold is not None)]
        per_problem = Counter(d.group for d in kept)
        one_each = all(n == 1 for n in per_problem.values())
        best = least_upper(len(per_problem), name, one_each, alpha)
        if best > value:
            need = problems_needed(Target(*(value if n == name else None for n in
                                    ("accuracy drop", "answers changed", "answers lost"))),
                           alpha, one_each)
            why = ("since the problem, not the run, is the independent unit (the runs of one "
                   "problem fail together)")
            fix = (f"raise the target to at least {pts(best)} points or add problems"
                   if best < 1.0 else "add problems")
            raise UserError(
                f"{option} {pts(value)} points is below what {len(per_problem)} held-out "
                f"problems can certify: even a policy that changes no answer has a 95% bound "
                f"of {pts(best)} points, {why}; {fix} (about {need} in all for "
                f"{pts(value)} points)")


def provenance(cal: Calibration, target: Target, source: str,
                seed: int) -> dict[str, str | int | float | bool]:
    assert cal.recommended is not None
    h = cal.recommended.holdout
    d = h.damage
    out: dict[str, str | int | float | bool] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "candidate": cal.recommended.candidate.name,
        "seed": seed,
        "holdout_records": cal.holdout_runs,
        "holdout_problems": cal.holdout_problems,
        "holdout_net_saved": round(h.net_saved, 6),
        "holdout_answers_changed": h.changed,
        "holdout_answers_changed_upper95": round(d.changed_upper, 6),
        "guarantee": "fixed-sequence testing, 95%, per new problem",
        "bound": "betting (Waudby-Smith & Ramdas 2023) over held-out problems",
    }
    if d.labelled_problems:
        out["holdout_answers_lost"] = h.lost
        out["holdout_answers_gained"] = h.gained
        out["holdout_answers_lost_upper95"] = round(d.lost_upper, 6)
        out["holdout_accuracy_drop"] = round(d.drop, 6)
        out["holdout_accuracy_drop_upper95"] = round(d.drop_upper, 6)
    for _, name, value in limits(target):
        out[f"target_max_{name.replace(' ', '_')}"] = value
    return out


def no_policy_message(cal: Calibration, target: Target) -> str:
    tested = [e for e in cal.evaluated if e.tested and e.holdout.net_saved > 0]
    if not tested:
        return "no candidate policy saves compute on the tuning split; nothing to recommend"

    def excess(e) -> float:  # how far the worst bound is past its target
        return max(((r.upper or 1.0) - r.target for r in target.risks(e.holdout)), default=0.0)

    best = min(tested, key=excess)
    bounds = ", ".join(f"{r.name} {pts(r.upper)} > {pts(r.target)}"
                       for r in target.risks(best.holdout) if (r.upper or 1.0) > r.target)
    return (f"no policy keeps its damage within the target at 95% confidence on the "
            f"{cal.holdout_problems} held-out problems; the nearest with positive savings is "
            f"{best.candidate.name} ({pts(best.holdout.net_saved)}% net saved; 95% bounds, "
            f"points: {bounds}); raise the target or add data")
