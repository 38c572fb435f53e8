"""Self-consistency replay: samples in recorded order, decide_sc at each step, majority vote."""

from __future__ import annotations

import pytest

from dynasorctl.calibration.bounds import clopper_pearson_upper
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.observed import ObservedProgram, ObservedRun
from dynasorctl.calibration.sc import (
    UNRECORDED_PROBE_TOKENS,
    replay_program,
    sc_candidates,
    sc_figures,
)
from dynasorctl.calibration.table import PROBE_PROMPT_COST
from proxy.core.policy import ProbeObservation, ScPolicy


def sample(final: str | None, tokens: int, early: str | None = None) -> ObservedRun:
    probes = tuple(ProbeObservation(p, early if p <= 256 else final, False)
                   for p in range(128, tokens, 128))
    return ObservedRun("s", "p", "m", probes, final, tokens)


def program(finals: list[str | None], gold: str | None = "1", tokens: int = 1000,
            early: str | None = None, pid: str = "p") -> ObservedProgram:
    return ObservedProgram(pid, pid, "m", tuple(sample(f, tokens, early) for f in finals), gold)


def test_agreeing_samples_stop_early() -> None:
    out = replay_program(program(["1", "1", "2", "2", "2"]), ScPolicy(min_samples=2), Grader())
    assert (out.samples, out.answer, out.probes, out.tokens) == (2, "1", 0, 2000)


def test_disagreement_draws_more_samples() -> None:
    policy = ScPolicy(threshold=0.5, min_samples=2, max_samples=8)
    out = replay_program(program(["1", "2", "2", "2"]), policy, Grader())
    # two groups of one: certaindex 0; then 2-of-3 (0.42); then 3-of-4 (0.59 >= 0.5)
    assert out.samples == 4 and out.answer == "2"


def test_max_samples_caps_the_program() -> None:
    out = replay_program(program(["1", "2", "3", "4", "5"]), ScPolicy(max_samples=3), Grader())
    assert out.samples == 3 and out.answer == "1"


def test_checks_by_probe_cost_probes() -> None:
    policy = ScPolicy(check_tokens=256, min_samples=2)
    out = replay_program(program(["1", "2", "3"], early="9"), policy, Grader())
    assert out.samples == 2 and out.answer == "1"  # the probes agreed on 9 at 256 tokens
    assert out.probes == 2 and out.probe_tokens == 2 * UNRECORDED_PROBE_TOKENS


def test_equivalent_answers_vote_together() -> None:
    out = replay_program(program(["0.5", "\\frac{1}{2}", "3"]), ScPolicy(min_samples=2), Grader())
    assert out.samples == 2


def test_all_samples_baseline() -> None:
    out = replay_program(program(["1", "2", "2"]), None, Grader())
    assert (out.samples, out.answer) == (3, "2")


def test_figures() -> None:
    programs = [program(["1", "1", "2", "2", "2"], gold="2", pid="a"),  # stops on 1: lost
                program(["3", "3", "3", "3"], gold="3", pid="b")]  # stops on 3: same
    f = sc_figures(programs, ScPolicy(min_samples=2), Grader())
    assert (f.runs, f.stopped, f.changed, f.lost, f.gained) == (2, 1.0, 1, 1, 0)
    assert f.samples_used == pytest.approx(4 / 9)
    assert f.net_saved == pytest.approx(5 / 9)
    assert f.accuracy_full == 1.0 and f.accuracy_policy == 0.5
    # Two programs of two problems: per problem, one program each, so the exact bound.
    assert (f.damage.problems, f.damage.lost, f.damage.drop) == (2, 0.5, 0.5)
    assert f.damage.lost_upper == clopper_pearson_upper(1, 2)


def test_probe_costs_count_against_savings() -> None:
    programs = [program(["1", "1", "1", "1"])]
    f = sc_figures(programs, ScPolicy(check_tokens=512, min_samples=2), Grader())
    cost = 2 * (UNRECORDED_PROBE_TOKENS + PROBE_PROMPT_COST)
    assert f.net_saved == pytest.approx((2000 - cost) / 4000)


def test_candidates_hold_both_baselines() -> None:
    names = [name for name, _ in sc_candidates(8)]
    assert names[0] == "all samples" and names[1].startswith("default")
    assert len(names) == len(set(names)) and len(names) > 50


def test_beta_rule_replays_as_decide_sc() -> None:
    # Leader probabilities: 1-1 at two samples 0.5, 2-1 at three 0.69, 3-1 at four 0.81.
    policy = ScPolicy(rule="beta", threshold=0.8, min_samples=2)
    out = replay_program(program(["1", "2", "1", "1", "2"]), policy, Grader())
    assert out.samples == 4 and out.answer == "1"
    stricter = policy.model_copy(update={"threshold": 0.9})
    assert replay_program(program(["1", "2", "1", "1", "2"]), stricter, Grader()).samples == 5


def test_candidates_search_both_rules() -> None:
    rules = {policy.rule for _, policy in sc_candidates(8) if policy is not None}
    assert rules == {"entropy", "beta"}
