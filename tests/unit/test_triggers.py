"""The new triggers in the one decision function: every branch, what is taken, causality."""

from __future__ import annotations

import random

import pytest

from proxy.core.policy import (
    CotPolicy,
    Observation,
    ProbeObservation,
    ScPolicy,
    StatementObservation,
    StatementTrigger,
    ThinkEndObservation,
    TransitionTrigger,
    causal_key,
    decide_cot,
    decide_sc,
    first_stop,
    in_causal_order,
    leader_probability,
    statement_due,
    taken,
)

TEXT_ONLY = CotPolicy(periodic=False, think_end=True)
STATEMENTS = CotPolicy(periodic=False, statement=StatementTrigger())
DEER = CotPolicy(periodic=False, transition=TransitionTrigger(min_confidence=0.999))


def probe(position: int, answer: str | None, confidence: float | None = None) -> ProbeObservation:
    return ProbeObservation(position, answer, False, 5, confidence=confidence)


def trial(position: int, answer: str | None, confidence: float) -> ProbeObservation:
    return ProbeObservation(position, answer, False, 4, confidence=confidence, trial=True)


def said(position: int, answer: str) -> StatementObservation:
    return StatementObservation(position, answer)


# --- the end of thinking --------------------------------------------------------------------


def test_think_end_stops_with_the_stated_answer() -> None:
    d = decide_cot(TEXT_ONLY, [ThinkEndObservation(900, "\\dfrac{1}{4}")])
    assert d.stop and d.answer == "\\dfrac{1}{4}" and d.source == "text"


def test_think_end_without_a_stated_answer_does_not_stop() -> None:
    d = decide_cot(TEXT_ONLY, [ThinkEndObservation(900, None)])
    assert not d.stop and d.reason == "no answer stated in the thinking"


def test_think_end_off_does_not_stop() -> None:
    d = decide_cot(CotPolicy(), [ThinkEndObservation(900, "4")])
    assert not d.stop and d.reason == "end of thinking not used"


def test_min_tokens_holds_for_every_trigger() -> None:
    policy = TEXT_ONLY.model_copy(update={"min_tokens": 1000})
    assert decide_cot(policy, [ThinkEndObservation(900, "4")]).reason == "before min_tokens"
    assert decide_cot(policy, [ThinkEndObservation(1000, "4")]).stop


# --- answer statements ----------------------------------------------------------------------


def test_a_statement_alone_never_stops() -> None:
    d = decide_cot(STATEMENTS, [said(100, "12")])
    assert not d.stop and "never stops" in d.reason


def test_probe_confirming_the_statement_stops() -> None:
    d = decide_cot(STATEMENTS, [said(100, "12"), probe(128, "12")])
    assert d.stop and d.answer == "12" and d.source == "probe"
    assert d.reason == "probe confirms the stated answer"


def test_probe_disagreeing_with_the_statement_does_not_stop() -> None:
    d = decide_cot(STATEMENTS, [said(100, "12"), probe(128, "13")])
    assert not d.stop and d.reason == "probe does not confirm the stated answer"
    assert not decide_cot(STATEMENTS, [said(100, "12"), probe(128, None)]).stop


def test_statement_probe_is_at_the_next_aligned_position() -> None:
    assert statement_due(STATEMENTS, [said(100, "12")], 128) is not None
    assert statement_due(STATEMENTS, [said(128, "12")], 128) is not None  # on the grid itself
    assert statement_due(STATEMENTS, [said(100, "12")], 192) is None  # one probe only
    assert statement_due(STATEMENTS, [said(100, "12")], 64) is None  # not before it
    d = decide_cot(STATEMENTS, [said(100, "12"), probe(192, "12")])
    assert not d.stop and d.reason == "probe not taken"


def test_a_restated_answer_triggers_no_new_probe() -> None:
    seq = [said(100, "12"), probe(128, "13"), said(150, "12")]
    assert statement_due(STATEMENTS, seq, 192) is None
    every = CotPolicy(periodic=False, statement=StatementTrigger(new_answers_only=False))
    assert statement_due(every, seq, 192) == said(150, "12")


def test_the_probe_checks_the_latest_statement() -> None:
    seq = [said(70, "12"), said(110, "13"), probe(128, "13")]
    assert decide_cot(STATEMENTS, seq).stop


def test_statement_confidence_gate() -> None:
    gated = CotPolicy(periodic=False, statement=StatementTrigger(min_confidence=0.9))
    assert not decide_cot(gated, [said(100, "12"), probe(128, "12")]).stop  # not measured
    assert not decide_cot(gated, [said(100, "12"), probe(128, "12", 0.5)]).stop
    assert decide_cot(gated, [said(100, "12"), probe(128, "12", 0.95)]).stop


# --- trials at transition words -------------------------------------------------------------


def test_confident_trial_stops() -> None:
    d = decide_cot(DEER, [trial(300, "204", 0.9995)])
    assert d.stop and d.answer == "204" and d.source == "trial"


def test_unconfident_trial_does_not_stop() -> None:
    d = decide_cot(DEER, [trial(300, "204", 0.99)])
    assert not d.stop and d.reason == "trial not confident"


def test_empty_trial_does_not_stop() -> None:
    d = decide_cot(DEER, [trial(300, None, 1.0)])
    assert not d.stop and d.reason == "trial gave no answer"


def test_trials_without_the_trigger_or_past_max_trials_are_not_taken() -> None:
    assert decide_cot(CotPolicy(), [trial(300, "4", 1.0)]).reason == "trial not taken"
    capped = CotPolicy(periodic=False, transition=TransitionTrigger(min_confidence=0.9,
                                                                    max_trials=1))
    d = decide_cot(capped, [trial(300, "4", 0.5), trial(400, "4", 1.0)])
    assert not d.stop and d.reason == "trial not taken"


def test_agreeing_trials_stop_below_the_threshold() -> None:
    rule = TransitionTrigger(min_confidence=0.999, agree=2, agree_confidence=0.95)
    policy = CotPolicy(periodic=False, transition=rule)
    assert decide_cot(policy, [trial(300, "4", 0.96), trial(400, "4", 0.97)]).stop
    assert not decide_cot(policy, [trial(300, "5", 0.96), trial(400, "4", 0.97)]).stop
    assert not decide_cot(policy, [trial(300, "4", 0.90), trial(400, "4", 0.97)]).stop
    assert not decide_cot(policy, [trial(400, "4", 0.97)]).stop  # only one so far


def test_periodic_off_takes_no_periodic_probe() -> None:
    d = decide_cot(DEER, [probe(64, "4"), probe(128, "4"), probe(192, "4")])
    assert not d.stop and d.reason == "probe not taken"


def test_periodic_confidence_gate() -> None:
    gated = CotPolicy(min_confidence=0.8)
    seq = [probe(64, "4", 0.9), probe(128, "4", 0.9), probe(192, "4", 0.5)]
    assert decide_cot(gated, seq).reason == "agreeing probe not confident"
    assert decide_cot(gated, seq[:2] + [probe(192, "4", 0.85)]).stop


# --- what a policy takes, and causality -----------------------------------------------------


def test_taken_counts_each_probe_once() -> None:
    policy = CotPolicy(interval=128, statement=StatementTrigger(),
                       transition=TransitionTrigger(min_confidence=0.999, max_trials=2))
    seq = in_causal_order([
        probe(64, "1"), said(70, "1"), probe(128, "1"), probe(192, "1"),  # 128: both triggers
        said(200, "2"), probe(256, "2"), trial(150, "1", 0.5), trial(210, "1", 0.5),
        trial(220, "1", 0.5),
    ])
    got = [(o.position, o.trial) for o in taken(policy, seq)]
    assert got == [(128, False), (150, True), (210, True), (256, False)]


def test_causal_order_at_one_position() -> None:
    seq = [ThinkEndObservation(128, "1"), trial(128, "1", 0.1), probe(128, "1"), said(128, "1")]
    assert [type(o).__name__ for o in in_causal_order(seq)] == [
        "StatementObservation", "ProbeObservation", "ProbeObservation", "ThinkEndObservation"]
    assert in_causal_order(seq)[2].trial


def _random_sequence(rng: random.Random) -> list[Observation]:
    answers = ["1", "2", None]
    seq: list[Observation] = []
    for position in range(64, 64 * 40, 64):
        seq.append(probe(position, rng.choice(answers), rng.random()))
        if rng.random() < 0.2:
            seq.append(said(position - rng.randrange(1, 64), rng.choice(["1", "2"])))
        if rng.random() < 0.3:
            seq.append(trial(position - rng.randrange(1, 64), rng.choice(answers),
                             rng.choice([0.5, 0.99, 0.9999])))
    seq.append(ThinkEndObservation(64 * 40, rng.choice(answers)))
    return in_causal_order(seq)


@pytest.mark.parametrize("policy", [
    CotPolicy(statement=StatementTrigger(), think_end=True, window=6),
    CotPolicy(interval=128, transition=TransitionTrigger(min_confidence=0.9999, agree=2,
                                                         agree_confidence=0.99)),
    CotPolicy(periodic=False, statement=StatementTrigger(new_answers_only=False),
              transition=TransitionTrigger(min_confidence=0.9999), think_end=True),
])
def test_nothing_after_the_stop_changes_the_decision(policy: CotPolicy) -> None:
    rng = random.Random(5)
    stopped = 0
    for _ in range(200):
        seq = _random_sequence(rng)
        index, decision = first_stop(policy, seq)
        if index is None:
            continue
        stopped += 1
        kept = seq[: index + 1]
        assert first_stop(policy, kept) == (index, decision)
        tail = _random_sequence(rng)
        later = [o for o in tail if causal_key(o) > causal_key(seq[index])]
        assert first_stop(policy, kept + later) == (index, decision)
        assert taken(policy, kept) == taken(policy, kept + later)[: len(taken(policy, kept))]
    assert stopped > 20


# --- self-consistency: the Beta rule --------------------------------------------------------


def test_leader_probability_is_the_beta_tail() -> None:
    assert leader_probability(0, 0) == 0.5
    assert leader_probability(1, 1) == 0.5
    assert leader_probability(2, 0) == 0.875  # 1 - 1/8
    assert leader_probability(3, 1) == 0.8125  # P(Beta(4, 2) > 1/2)
    assert leader_probability(5, 0) > leader_probability(4, 0) > leader_probability(3, 0)


def test_beta_rule_branches() -> None:
    policy = ScPolicy(rule="beta", threshold=0.85, min_samples=2, max_samples=8)
    assert decide_sc(policy, ["1"]).reason == "below min_samples"
    d = decide_sc(policy, ["1", "1"])
    assert d.stop and d.answer == "1" and d.reason == "leader probability 0.88"
    d = decide_sc(policy, ["1", "2", "1"])
    assert not d.stop and d.reason == "leader probability 0.69 below threshold"
    assert not decide_sc(policy, [None, None]).stop
    assert decide_sc(policy, ["1", "2", "3", "4", "5", "6", "7", "8"]).reason == (
        "max_samples reached")
    # Unanswered samples do not count for the runner-up: 2 against 0.
    assert decide_sc(policy, ["1", None, "1"]).stop
