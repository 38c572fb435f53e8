"""Damage per problem: what a policy did to each problem's records, and bounds on its mean.

A record is a run (chain-of-thought) or a program (self-consistency); a problem is
its group. Each measure is a share of one problem's records, averaged over problems,
which is the run share itself when every problem has the same number of records.
The bounds are on that mean over new problems, the operator's future traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from dynasorctl.calibration.bounds import betting_upper, clopper_pearson_upper, problem_order


@dataclass(frozen=True, slots=True)
class Damage:
    """Means over problems (shares: 0.005 is half a point) and their 95% upper bounds.

    Bounds are None where not computed (the tuning split) or without labels. The
    `_runs` bounds count records as independent trials: shown for comparison only,
    as they are too tight when the records of one problem fail together.
    """

    problems: int
    labelled_problems: int
    changed: float  # answers changed against the unstopped record
    lost: float | None  # labelled records right unstopped and wrong under the policy
    drop: float | None  # accuracy drop: (lost - gained) / labelled records
    changed_upper: float | None = None
    lost_upper: float | None = None
    drop_upper: float | None = None
    changed_upper_runs: float | None = None
    lost_upper_runs: float | None = None


def problem_ranks(groups: Sequence[str]) -> np.ndarray:
    """Each record's problem, numbered in `problem_order`."""
    rank = {g: i for i, g in enumerate(problem_order(groups))}
    return np.asarray([rank[g] for g in groups], np.int64)


def _upper(events: np.ndarray, records: np.ndarray, alpha: float, lo: float = 0.0) -> float:
    """Bound on the mean over problems of events / records (problems in rank order)."""
    if records.size and lo == 0.0 and (records == 1).all():
        # One record a problem: each share is a 0/1 outcome, so the exact binomial bound.
        return clopper_pearson_upper(int(events.sum()), int(records.size), alpha)
    return betting_upper(events / records, alpha, lo, 1.0)


def damage(problem: np.ndarray, changed: np.ndarray, labelled: np.ndarray, lost: np.ndarray,
           gained: np.ndarray, alpha: float = 0.05, bounds: bool = True,
           run_level: bool = True) -> Damage:
    """The damage over these records; `problem[i]` is record i's rank from `problem_ranks`.

    The other arguments are per-record booleans. `run_level`: also the run-level bounds
    (shown for comparison only; not needed to order or certify).
    """
    size = int(problem.max()) + 1 if problem.size else 0

    def per_problem(flags: np.ndarray) -> np.ndarray:
        return np.bincount(problem, weights=flags.astype(float), minlength=size)

    records = per_problem(np.ones(problem.size, bool))
    present = records > 0
    n_lab = per_problem(labelled)
    has_lab = n_lab > 0
    d_changed = per_problem(changed)[present]
    d_lost = per_problem(lost)[has_lab]
    d_net = d_lost - per_problem(gained)[has_lab]
    n_present, n_labelled = records[present], n_lab[has_lab]
    labelled_problems = int(has_lab.sum())
    out = Damage(
        problems=int(present.sum()),
        labelled_problems=labelled_problems,
        changed=float((d_changed / n_present).mean()) if n_present.size else 0.0,
        lost=float((d_lost / n_labelled).mean()) if labelled_problems else None,
        drop=float((d_net / n_labelled).mean()) if labelled_problems else None,
    )
    if not bounds:
        return out
    n_records, n_lab_records = int(problem.size), int(labelled.sum())
    return replace(
        out,
        changed_upper=_upper(d_changed, n_present, alpha),
        lost_upper=_upper(d_lost, n_labelled, alpha) if labelled_problems else None,
        drop_upper=_upper(d_net, n_labelled, alpha, lo=-1.0) if labelled_problems else None,
        changed_upper_runs=(clopper_pearson_upper(int(changed.sum()), n_records, alpha)
                            if run_level else None),
        lost_upper_runs=(clopper_pearson_upper(int(lost.sum()), n_lab_records, alpha)
                         if n_lab_records and run_level else None),
    )


def least_upper(problems: int, measure: str, one_record_each: bool, alpha: float = 0.05) -> float:
    """The 95% bound on `measure` of a policy that damages none of `problems` problems.

    No target below it can be certified on that many problems. `measure`: "accuracy
    drop" (signed, so always bounded by betting), "answers lost" or "answers changed".
    """
    records = np.ones(problems) if one_record_each else np.full(problems, 2.0)
    lo = -1.0 if measure == "accuracy drop" else 0.0
    return _upper(np.zeros(problems), records, alpha, lo)
