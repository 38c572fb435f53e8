"""The vectorised replay of the new triggers is the decision function, observation for observation."""

from __future__ import annotations

import random

import pytest

from dynasorctl.calibration.observed import ObservedRun, load_trace_files
from dynasorctl.calibration.replay import SOURCES, Replayer
from dynasorctl.calibration.table import build_table
from dynasorctl.traces import PACKAGED_SAMPLE, PACKAGED_TRIALS
from proxy.core.certaindex import normalize_answer
from proxy.core.policy import (
    FEATURES,
    CotPolicy,
    StatementTrigger,
    StopRule,
    TransitionTrigger,
    first_stop,
    taken,
)


def random_policy(rng: random.Random) -> CotPolicy:
    """Any mix of triggers, with gates and schedules the search may or may not use."""
    statement = transition = None
    if rng.random() < 0.6:
        statement = StatementTrigger(align=rng.choice([64, 128]),
                                     new_answers_only=rng.random() < 0.7)
    if rng.random() < 0.6:
        agree = rng.choice([None, 2, 3])
        transition = TransitionTrigger(
            min_confidence=rng.choice([0.9, 0.99, 0.999, 0.9999]) if agree is None or
            rng.random() < 0.5 else None,
            agree=agree, agree_confidence=None if agree is None else rng.choice([0.5, 0.9, 0.99]),
            max_trials=rng.choice([1, 5, 30]))
    think_end = rng.random() < 0.5
    periodic = rng.random() < 0.5 or not (statement or transition or think_end)
    rule = None
    if periodic and rng.random() < 0.3:
        rule = StopRule(features=FEATURES, weights=tuple(rng.gauss(0, 3) for _ in FEATURES),
                        bias=rng.gauss(0, 1), threshold=0.6)
    return CotPolicy(
        periodic=periodic, interval=rng.choice([64, 128, 256]),
        early_interval=rng.choice([None, 512]), dense_from=rng.choice([0, 2048]),
        window=rng.choice([1, 2, 4, 8]), agree_share=rng.choice([1.0, 1.0, 0.75, 0.5]),
        min_tokens=rng.choice([0, 0, 512]), rule=rule, statement=statement,
        transition=transition, think_end=think_end)


@pytest.fixture(scope="module")
def replayer() -> Replayer:
    runs = load_trace_files([PACKAGED_SAMPLE], [PACKAGED_TRIALS]).data
    return Replayer(build_table(runs))  # type: ignore[arg-type]


def check_policy(replayer: Replayer, policy: CotPolicy) -> int:
    """Assert the replay equals `first_stop` on every run; the number of runs stopped."""
    t = replayer.t
    stops = replayer.stops(policy)
    stopped = 0
    for r in range(t.n_runs):
        seq = t.observations(r)
        index, decision = first_stop(policy, seq)
        took = taken(policy, seq if index is None else seq[: index + 1])
        where = (policy, t.runs[r].run_id)
        assert stops.probes[r] == len(took), where
        assert stops.decoded[r] == sum(p.tokens for p in took), where
        assert stops.cost[r] == sum(p.tokens + 8 for p in took), where
        if index is None:
            assert stops.pos[r] == -1 and stops.key[r] == -1, where
            continue
        stopped += 1
        assert stops.pos[r] == seq[index].position, where
        assert SOURCES[int(stops.source[r])] == decision.source, where
        assert normalize_answer(t.key_answer[stops.key[r]]) == normalize_answer(
            decision.answer), where
    return stopped


def test_replay_equals_the_decision_for_every_trigger(replayer: Replayer) -> None:
    rng = random.Random(11)
    stopped = sum(check_policy(replayer, random_policy(rng)) for _ in range(80))
    assert stopped > 80 * replayer.t.n_runs // 4  # the policies do stop, often


@pytest.mark.parametrize("policy", [
    CotPolicy(periodic=False, think_end=True),
    CotPolicy(periodic=False, statement=StatementTrigger()),
    CotPolicy(periodic=False, transition=TransitionTrigger(min_confidence=0.999)),
    CotPolicy(periodic=False, transition=TransitionTrigger(agree=2, agree_confidence=0.99)),
    CotPolicy(window=4, agree_share=0.5, statement=StatementTrigger(), think_end=True),  # exact
    CotPolicy(min_confidence=0.5, think_end=True),  # a periodic confidence gate: exact path
    CotPolicy(periodic=False, statement=StatementTrigger(min_confidence=0.5), think_end=True),
])
def test_each_trigger_alone(replayer: Replayer, policy: CotPolicy) -> None:
    check_policy(replayer, policy)


def test_every_trigger_can_stop(replayer: Replayer) -> None:
    for policy, source in [
        (CotPolicy(periodic=False, think_end=True), "text"),
        (CotPolicy(periodic=False, statement=StatementTrigger()), "probe"),
        (CotPolicy(periodic=False, transition=TransitionTrigger(min_confidence=0.999)), "trial"),
    ]:
        stops = replayer.stops(policy)
        assert {SOURCES[int(s)] for s in stops.source[stops.stopped]} == {source}
        assert stops.stopped.sum() >= 5


def test_runs_without_trials_or_text_never_stop_on_them() -> None:
    runs = [ObservedRun("a", "g", "m", (), "1", 100)]
    stops = Replayer(build_table(runs)).stops(CotPolicy(
        periodic=False, think_end=True, statement=StatementTrigger(),
        transition=TransitionTrigger(min_confidence=0.5)))
    assert stops.pos.tolist() == [-1] and stops.probes.tolist() == [0]
