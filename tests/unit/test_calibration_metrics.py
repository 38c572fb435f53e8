"""Grading, figures, the split, the frontier and the learned rule, on small hand-made data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynasorctl.calibration.bounds import betting_upper, clopper_pearson_upper, problem_order
from dynasorctl.calibration.damage import Damage, damage, problem_ranks
from dynasorctl.calibration.grading import Grader, load_cache, plain_number, save_cache
from dynasorctl.calibration.learn import fit_logistic
from dynasorctl.calibration.metrics import Grades, figures, never_stop_stops
from dynasorctl.calibration.observed import ObservedRun
from dynasorctl.calibration.replay import Replayer
from dynasorctl.calibration.search import (
    Candidate,
    Evaluated,
    Risk,
    Target,
    certify,
    pareto,
    split_by_group,
)
from dynasorctl.calibration.table import build_table
from proxy.core.policy import CotPolicy, ProbeObservation


class CountingSlow:
    """Stands in for math-verify: says equal for the pairs it is told, counts calls."""

    def __init__(self, equal: set[tuple[str, str]] = frozenset(), keep: bool = True) -> None:
        self.equal = equal
        self.keep = keep
        self.calls: list[tuple[str, str]] = []

    def __call__(self, pairs: list[tuple[str, str]]) -> list[tuple[bool, bool]]:
        self.calls += pairs
        return [(p in self.equal or p[::-1] in self.equal, self.keep) for p in pairs]


# --- grading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("12", 12.0), ("-3.5", -3.5), ("\\frac{1}{2}", 0.5), ("\\dfrac{3}{4}", 0.75),
    ("2\\sqrt{3}", 2 * 3**0.5), ("3\\pi", 3 * 3.141592653589793), ("2^{10}", 1024.0),
    ("(1+2)*3", 9.0), ("033", 33.0), ("50\\%", 50.0),
])
def test_plain_numbers(text: str, value: float) -> None:
    assert plain_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["4\\frac{2}{3}", "x+1", "(1,2)", "1,000", "\\frac{1}{0}", "",
                                  None, "2^{1000}", "\\sqrt{-1}", "1e5"])
def test_not_plain_numbers(text: str | None) -> None:
    assert plain_number(text) is None


def test_grader_settles_easy_pairs_without_math_verify() -> None:
    slow = CountingSlow()
    g = Grader(slow=slow)
    assert not g.same("12", "13")  # two numbers apart
    assert g.same("0.5", "\\frac{1}{2}")  # the same number
    assert g.same("\\dfrac{1}{2}", "\\frac{1}{2}")  # the same after normalising
    assert not g.same("A", "204")  # a name is never a number
    assert not g.same(None, "1")
    assert slow.calls == []


def test_grader_asks_math_verify_once_per_pair() -> None:
    slow = CountingSlow(equal={("x+1", "1+x")})
    g = Grader(slow=slow)
    assert g.same_many([("x+1", "1+x"), ("1+x", "x+1"), ("x+1", "1+x")]) == [True] * 3
    assert len(slow.calls) == 1 and g.slow_checks == 1
    assert g.learned == {("1+x", "x+1"): True}


def test_grader_does_not_keep_verdicts_that_may_be_timeouts() -> None:
    g = Grader(slow=CountingSlow(keep=False))
    assert not g.same("x", "y+1")
    assert g.learned == {}


def test_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "checks.json"
    save_cache(path, {("a", "b"): True, ("c", "d"): False})
    assert load_cache(path) == {("a", "b"): True, ("c", "d"): False}
    g = Grader(slow=CountingSlow(), known=load_cache(path))
    assert g.same("b", "a")
    (tmp_path / "bad.json").write_text("not json")
    assert load_cache(tmp_path / "bad.json") == {} and load_cache(tmp_path / "none") == {}


def test_grader_with_real_math_verify() -> None:
    g = Grader()
    assert g.same("\\frac{1}{2}", "0.5")
    assert g.same("(1,2)", "(1, 2)")
    assert not g.same("(1,2)", "(2,1)")


# --- figures ----------------------------------------------------------------------------------


def run(name: str, answers: list[str | None], final: str, gold: str | None, tokens: int,
        final_correct: bool | None = None) -> ObservedRun:
    probes = tuple(ProbeObservation(64 * (i + 1), a, False, 2) for i, a in enumerate(answers))
    return ObservedRun(name, name, "m", probes, final, tokens, gold, final_correct)


def test_figures_by_hand() -> None:
    runs = [
        run("a", ["5", "7", "7", "7", "7"], "7", "7", 1000),  # stops at 256 on the right answer
        run("b", ["3", "3", "3", "9"], "9", "9", 500),  # stops at 192 on a wrong answer: lost
        run("c", ["1", "2", "1", "2"], "2", "4", 300),  # never stops
        run("d", ["8", "8", "8"], "6", "8", 400),  # stops at 192, right where final was wrong
    ]
    t = build_table(runs)
    stops = Replayer(t).stops(CotPolicy())  # three agreeing probes every 64 tokens
    assert [int(t.pos[r]) if r >= 0 else None for r in stops.row] == [256, 192, None, 192]
    grades = Grades(t, Grader(slow=CountingSlow()))
    f = figures(t, grades, stops, np.ones(4, bool))
    # probes taken: 4 + 3 + 4 + 3, each 2 decoded + 8 prompt tokens
    saved, cost, total = (1000 - 256) + (500 - 192) + (400 - 192), 14 * 10, 2200
    assert f.gross_saved == pytest.approx(saved / total)
    assert f.probe_cost == pytest.approx(cost / total)
    assert f.net_saved == pytest.approx((saved - cost) / total)
    assert f.stopped == 0.75
    assert (f.changed, f.lost, f.gained, f.labelled) == (2, 1, 1, 4)
    assert f.accuracy_full == 0.5 and f.accuracy_policy == 0.5
    d = f.damage  # each run is its own problem here
    assert (d.problems, d.labelled_problems, d.changed, d.lost, d.drop) == (4, 4, 0.5, 0.25, 0.0)
    # One run a problem: answers lost is a 0/1 outcome per problem, so the exact bound.
    assert d.lost_upper == clopper_pearson_upper(1, 4) == d.lost_upper_runs
    assert d.drop_upper is not None and 0.25 < d.drop_upper <= 1.0


def test_source_grading_is_kept_for_answers_equal_to_the_final() -> None:
    # The source graded "864" wrong against "864 inches^2"; stopping on "864" changes nothing.
    runs = [run("a", ["864", "864", "864", "1"], "864", "864 \\mbox{ inches}^2", 800,
                final_correct=False)]
    t = build_table(runs)
    grades = Grades(t, Grader(slow=CountingSlow(equal={("864", "864 \\mbox{ inches}^2")})))
    f = figures(t, grades, Replayer(t).stops(CotPolicy()), np.ones(1, bool))
    assert (f.changed, f.lost, f.gained) == (0, 0, 0)


def test_unlabelled_runs_count_changed_answers_only() -> None:
    runs = [run("a", ["1", "1", "1", "2"], "2", None, 800)]
    t = build_table(runs)
    f = figures(t, Grades(t, Grader(slow=CountingSlow())), Replayer(t).stops(CotPolicy()),
                np.ones(1, bool))
    assert f.changed == 1 and f.labelled == 0 and f.damage.lost_upper is None
    assert f.damage.drop is None and f.damage.changed_upper is not None
    assert f.accuracy_full is None


def test_never_stop_saves_nothing() -> None:
    t = build_table([run("a", ["1", "1", "1"], "1", "1", 300)])
    f = figures(t, Grades(t, Grader(slow=CountingSlow())), never_stop_stops(t), np.ones(1, bool))
    assert (f.net_saved, f.stopped, f.changed, f.lost) == (0.0, 0.0, 0, 0)


# --- search -----------------------------------------------------------------------------------


def test_split_keeps_each_problem_on_one_side() -> None:
    groups = [f"p{i % 40}" for i in range(240)]
    tune = split_by_group(groups, seed=1)
    assert not ({g for g, t in zip(groups, tune) if t} & {g for g, t in zip(groups, tune) if not t})
    assert tune.sum() == 120
    assert np.array_equal(tune, split_by_group(groups, seed=1))
    assert not np.array_equal(tune, split_by_group(groups, seed=2))


def test_pareto() -> None:
    points = [(0.0, 0.0), (0.1, 0.05), (0.05, 0.06), (0.3, 0.2), (0.3, 0.25), (-0.1, 0.0)]
    assert pareto(points) == [0, 1, 3]


class F:
    """Figures as the search reads them: net saved and the accuracy drop per problem."""

    def __init__(self, net: float, drop: float, upper: float | None = None) -> None:
        self.net_saved = net
        self.damage = Damage(problems=200, labelled_problems=200, changed=drop, lost=drop,
                             drop=drop, changed_upper=upper, lost_upper=upper, drop_upper=upper)


def test_certify_tests_the_frontier_in_order_of_risk() -> None:
    evaluated = [Evaluated(Candidate("never", None), F(0.0, 0)),
                 Evaluated(Candidate("a", 1), F(0.05, 0)),
                 Evaluated(Candidate("b", 2), F(0.1, 0.001)),
                 Evaluated(Candidate("c", 3), F(0.2, 0.005)),
                 Evaluated(Candidate("d", 4), F(0.3, 0.009)),
                 Evaluated(Candidate("dominated", 5), F(0.04, 0.003))]
    held = {"never": F(0.0, 0, 0.004), "a": F(0.05, 0, 0.004), "b": F(0.1, 0.002, 0.008),
            "c": F(0.2, 0.03, 0.05), "d": F(0.3, 0, 0.004), "dominated": F(0.04, 0, 0.004)}
    certify(evaluated, lambda e: held[e.candidate.name], Target(0.01, None), 0.05, baselines=1)
    by = {e.candidate.name: e for e in evaluated}
    assert [by[n].certified for n in "abcd"] == [True, True, False, False]  # d: after a failure
    assert by["d"].tested and not by["dominated"].tested and by["never"].holdout is not None


def test_target_risks() -> None:
    f = F(0.1, 0.003, 0.02)
    assert Target(0.005, None).risks(f) == [Risk("accuracy drop", 0.003, 0.02, 0.005)]
    assert [(r.name, r.target) for r in Target(0.005, 0.01, 0.02).risks(f)] == [
        ("accuracy drop", 0.005), ("answers lost", 0.02), ("answers changed", 0.01)]
    assert Target(0.005, 0.01).load(f) == pytest.approx(0.6)  # the binding risk, 0.003 / 0.005
    f.damage = Damage(problems=200, labelled_problems=0, changed=0.0, lost=None, drop=None)
    assert Target(0.005, None, 0.01).risks(f) == []  # no labels: nothing to say on accuracy


# --- damage per problem -----------------------------------------------------------------------


def test_damage_per_problem_by_hand() -> None:
    # Problems x (three runs, two damaged), y (three runs, none), z (two runs, one gained).
    problem = problem_ranks(list("xxxyyyzz"))
    lost = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    gained = np.array([0, 0, 0, 0, 0, 0, 1, 0], bool)
    labelled = np.ones(8, bool)
    d = damage(problem, lost | gained, labelled, lost, gained)
    assert (d.problems, d.labelled_problems) == (3, 3)
    assert d.lost == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert d.drop == pytest.approx((2 / 3 + 0 - 1 / 2) / 3)
    assert d.changed == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)
    # Several runs a problem: the problem shares, in the fixed order, bounded by betting.
    shares = {"x": 2 / 3, "y": 0.0, "z": 0.0}
    assert d.lost_upper == betting_upper([shares[k] for k in problem_order("xyz")])
    assert d.lost_upper_runs == clopper_pearson_upper(2, 8)
    assert d.changed_upper_runs == clopper_pearson_upper(3, 8)
    unlabelled = damage(problem, lost, np.zeros(8, bool), lost, gained)
    assert unlabelled.lost is None and unlabelled.drop_upper is None
    assert damage(problem, lost, labelled, lost, gained, bounds=False).lost_upper is None


def test_more_runs_of_the_same_problems_do_not_tighten_the_bound() -> None:
    """Six copies of each problem's run carry no more evidence than one: the run-level
    bound shrinks, the per-problem one does not move."""
    rng = np.random.default_rng(4)
    lost = rng.random(200) < 0.05
    one = damage(problem_ranks([f"p{i}" for i in range(200)]), lost, np.ones(200, bool), lost,
                 np.zeros(200, bool))
    six = damage(problem_ranks([f"p{i}" for i in range(200) for _ in range(6)]),
                 np.repeat(lost, 6), np.ones(1200, bool), np.repeat(lost, 6),
                 np.zeros(1200, bool))
    assert six.lost == one.lost
    assert six.lost_upper_runs < 0.8 * one.lost_upper_runs
    assert six.lost_upper >= one.lost_upper  # betting, not exact: never tighter than exact


# --- the learned rule -------------------------------------------------------------------------


def test_logistic_fit_recovers_the_signal() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, 0.0]
    logit = 2.0 * x[:, 0] - 0.4 * (x[:, 1] - 2.0)
    y = (rng.random(4000) < 1 / (1 + np.exp(-logit))).astype(float)
    w, b = fit_logistic(x, y, l2=0.1)
    assert w[0] == pytest.approx(2.0, rel=0.2) and w[1] == pytest.approx(-0.4, rel=0.2)
    assert abs(w[2]) < 1.0 and b == pytest.approx(0.8, abs=0.3)
