"""What a policy did to a set of runs: compute saved, requests stopped, answers changed.

Net compute saved = (main tokens not generated - probe cost) / main tokens of the
unstopped runs, where each probe the policy took costs its decoded tokens plus
PROBE_PROMPT_COST token-equivalents of prompt. Answers are compared with the
math-aware grader, once per (run, answer) and only for answers some policy stops on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynasorctl.calibration.damage import Damage, damage, problem_ranks
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.replay import Stops
from dynasorctl.calibration.table import ProbeTable


class Grades:
    """Per answer id, lazily: whether it is the run's final answer, and the credit it earns.

    A stop on an answer equivalent to the final answer changes nothing, so it is
    credited with the run's own grading (the source's `final_correct` where given);
    any other answer is graded against the gold. Correctness is graded first: an
    answer right where the final answer is wrong (or the reverse) differs from it,
    two right answers agree, and only two wrong answers need comparing directly.
    """

    def __init__(self, table: ProbeTable, grader: Grader) -> None:
        self.t = table
        self.grader = grader
        n_keys = len(table.key_answer)
        self.correct = np.full(n_keys, -1, np.int8)  # credit of a stop here; -1: no gold
        self.same_final = np.full(n_keys, -1, np.int8)
        self.graded = np.zeros(n_keys, bool)
        # Each run's problem in the bounds' fixed order (kept here: built once per table).
        self.problem = problem_ranks([run.group for run in table.runs])
        self.full_correct = np.full(table.n_runs, -1, np.int8)  # -1: unlabelled
        self._final_right = np.full(table.n_runs, -1, np.int8)  # our grading of the final
        ungraded = [r for r, run in enumerate(table.runs)
                    if run.final_correct is None and run.gold is not None]
        verdicts = grader.same_many([(table.runs[r].gold, table.runs[r].final_answer)
                                     for r in ungraded])
        for r, run in enumerate(table.runs):
            if run.final_correct is not None:
                self.full_correct[r] = int(run.final_correct)
        for r, right in zip(ungraded, verdicts):
            self.full_correct[r] = self._final_right[r] = int(right)

    @property
    def labelled(self) -> np.ndarray:
        return self.full_correct >= 0

    def ensure(self, keys: np.ndarray) -> None:
        """Grade these answer ids if not done yet (all at once: slow checks run together)."""
        todo = np.unique(keys[keys >= 0])
        todo = todo[~self.graded[todo]].tolist()
        if not todo:
            return
        t = self.t
        runs = [int(t.key_run[k]) for k in todo]
        labelled = [i for i, r in enumerate(runs) if t.runs[r].gold is not None]
        finals = sorted({runs[i] for i in labelled if self._final_right[runs[i]] < 0})
        verdicts = self.grader.same_many(
            [(t.runs[r].gold, t.runs[r].final_answer) for r in finals]
            + [(t.runs[runs[i]].gold, t.key_answer[todo[i]]) for i in labelled])
        for r, right in zip(finals, verdicts):
            self._final_right[r] = int(right)
        right_of = dict(zip(labelled, verdicts[len(finals):]))
        pending = []
        for i in range(len(todo)):
            if i in right_of and right_of[i] != bool(self._final_right[runs[i]]):
                self.same_final[todo[i]] = 0
            elif right_of.get(i):
                self.same_final[todo[i]] = 1
            else:
                pending.append(i)
        same = self.grader.same_many(
            [(t.runs[runs[i]].final_answer, t.key_answer[todo[i]]) for i in pending])
        for i, verdict in zip(pending, same):
            self.same_final[todo[i]] = int(verdict)
        for i, right in right_of.items():
            k = todo[i]
            self.correct[k] = self.full_correct[runs[i]] if self.same_final[k] else int(right)
        self.graded[todo] = True


@dataclass(frozen=True, slots=True)
class Answers:
    """How a policy's answers compare with the unstopped runs' (shares are fractions)."""

    runs: int
    changed: int  # answers that differ from the unstopped run's
    labelled: int  # runs with a gold answer
    lost: int  # labelled runs right unstopped and wrong under the policy
    gained: int  # labelled runs wrong unstopped and right under the policy
    accuracy_full: float | None
    accuracy_policy: float | None
    damage: Damage  # per problem, with the 95% bounds where computed

    @property
    def changed_share(self) -> float:
        return self.changed / self.runs if self.runs else 0.0

    @property
    def lost_share(self) -> float | None:
        return self.lost / self.labelled if self.labelled else None

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_full is None or self.accuracy_policy is None:
            return None
        return self.accuracy_full - self.accuracy_policy


@dataclass(frozen=True, slots=True)
class Figures(Answers):
    """A policy on one set of runs."""

    stopped: float  # share of runs stopped
    net_saved: float  # (main tokens saved - probe cost) / main tokens
    gross_saved: float  # main tokens saved / main tokens
    probe_cost: float  # probe cost / main tokens


def never_stop_stops(table: ProbeTable) -> Stops:
    """The baseline: no probes, no stops."""
    zeros = np.zeros(table.n_runs, np.int64)
    none = np.full(table.n_runs, -1, np.int64)
    return Stops(row=none, key=none, probes=zeros, cost=zeros, decoded=zeros, pos=none,
                 source=zeros)


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Per run of the selection: what the policy did to its answer (bool arrays)."""

    changed: np.ndarray  # differs from the unstopped run's answer
    labelled: np.ndarray  # the run has a gold answer
    lost: np.ndarray  # labelled, right unstopped, wrong under the policy
    gained: np.ndarray  # labelled, wrong unstopped, right under the policy


def outcomes(table: ProbeTable, grades: Grades, stops: Stops, runs: np.ndarray) -> Outcomes:
    """Each selected run's outcome under `stops` (`runs`: a boolean mask over all runs)."""
    grades.ensure(stops.key[runs & stops.stopped])
    stopped = stops.stopped[runs]
    key = stops.key[runs]
    same = np.where(stopped, grades.same_final[np.maximum(key, 0)] == 1, True)
    same &= ~(stopped & (key < 0))
    full = grades.full_correct[runs]
    labelled = full >= 0
    policy_ok = np.where(stopped, grades.correct[np.maximum(key, 0)] == 1, full == 1)
    policy_ok &= ~(stopped & (key < 0))
    return Outcomes(changed=~same, labelled=labelled, lost=labelled & (full == 1) & ~policy_ok,
                    gained=labelled & (full == 0) & policy_ok)


def figures(table: ProbeTable, grades: Grades, stops: Stops, runs: np.ndarray,
            alpha: float = 0.05, bounds: bool = True, run_level: bool = True) -> Figures:
    """The figures of `stops` over the runs selected by the boolean mask `runs`.

    `bounds`: compute the 95% bounds on damage (held out; on the tuning split only to order
    the testing, and without the run-level ones: `run_level`).
    """
    out = outcomes(table, grades, stops, runs)
    n = int(runs.sum())
    main = table.main_tokens[runs]
    total = float(main.sum()) or 1.0
    stopped = stops.stopped[runs]
    stop_pos = stops.pos[runs]
    saved = float(np.where(stopped, main - stop_pos, 0).sum())
    cost = float(stops.cost[runs].sum())
    changed = int(out.changed.sum())
    full = grades.full_correct[runs]
    labelled = out.labelled
    n_lab = int(labelled.sum())
    lost = int(out.lost.sum())
    gained = int(out.gained.sum())
    right_full = int((full[labelled] == 1).sum())
    return Figures(
        runs=n,
        stopped=float(stopped.mean()) if n else 0.0,
        net_saved=(saved - cost) / total,
        gross_saved=saved / total,
        probe_cost=cost / total,
        changed=changed,
        labelled=n_lab,
        lost=lost,
        gained=gained,
        accuracy_full=right_full / n_lab if n_lab else None,
        accuracy_policy=(right_full - lost + gained) / n_lab if n_lab else None,
        damage=damage(grades.problem[runs], out.changed, out.labelled, out.lost, out.gained,
                      alpha, bounds, run_level),
    )
