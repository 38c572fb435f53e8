"""The one decision function: every branch of the stop rules, causality, text signals."""

from __future__ import annotations

import random

import pytest

from proxy.core.policy import (
    FEATURES,
    PAPER_DEFAULT,
    CotPolicy,
    ProbeObservation,
    ScPolicy,
    StopRule,
    TextSignals,
    cot_features,
    decide_cot,
    decide_sc,
    first_stop,
    probe_due,
    probes_used,
    sc_answer_at_check,
    text_signals,
)


def probes(*answers: str | None, interval: int = 64, hesitant: tuple[int, ...] = ()) -> list:
    return [ProbeObservation((i + 1) * interval, a, i in hesitant, 5)
            for i, a in enumerate(answers)]


# --- decide_cot: each branch ------------------------------------------------------------------


def test_no_probe_yet() -> None:
    d = decide_cot(PAPER_DEFAULT, [])
    assert not d.stop and d.reason == "no probe yet"


def test_probes_off_schedule_are_not_used() -> None:
    d = decide_cot(CotPolicy(interval=128), probes("7"))  # only position 64
    assert not d.stop and d.reason == "probe not taken"


def test_before_min_tokens() -> None:
    d = decide_cot(CotPolicy(min_tokens=1000), probes("7", "7", "7"))
    assert not d.stop and d.reason == "before min_tokens"


def test_window_not_full() -> None:
    d = decide_cot(PAPER_DEFAULT, probes("7", "7"))
    assert not d.stop and d.reason == "window not full"


def test_answers_disagree() -> None:
    d = decide_cot(PAPER_DEFAULT, probes("7", "8", "7"))
    assert not d.stop and d.reason == "answers disagree"


def test_no_answers_in_window() -> None:
    d = decide_cot(PAPER_DEFAULT, probes(None, None, None))
    assert not d.stop and d.reason == "no answers in window"


def test_stop_when_window_agrees_answers_latest_spelling() -> None:
    d = decide_cot(PAPER_DEFAULT, probes("1", "\\frac{1}{2}", "\\dfrac{1}{2}", "\\frac{1}{2} "))
    assert d.stop and d.answer == "\\frac{1}{2} " and d.reason == "3/3 probes agree"


def test_agree_share_majority() -> None:
    policy = CotPolicy(window=4, agree_share=0.75)
    assert decide_cot(policy, probes("7", "8", "7", "7")).stop
    assert not decide_cot(policy, probes("7", "8", "9", "7")).stop


def test_hesitant_probes_excluded_from_window() -> None:
    seq = probes("7", "7", "8", "7", hesitant=(2,))
    assert decide_cot(CotPolicy(hesitation="exclude"), seq).stop
    assert not decide_cot(CotPolicy(hesitation="ignore"), seq).stop


def test_hesitant_probe_vetoes() -> None:
    seq = probes("7", "7", "7", hesitant=(1,))
    d = decide_cot(CotPolicy(hesitation="veto"), seq)
    assert not d.stop and d.reason == "hesitant probe in window"
    assert decide_cot(CotPolicy(hesitation="ignore"), seq).stop


def test_learned_rule_gates_the_stop() -> None:
    seq = probes("7", "7", "7")
    eager = StopRule(features=("run_tokens",), weights=(10.0,), bias=0.0, threshold=0.5)
    strict = StopRule(features=("run_tokens",), weights=(1.0,), bias=-5.0, threshold=0.5)
    assert decide_cot(CotPolicy(rule=eager), seq).stop
    d = decide_cot(CotPolicy(rule=strict), seq)
    assert not d.stop and d.reason == "learned rule not confident"


def test_max_probes_stops_probing() -> None:
    policy = CotPolicy(max_probes=2, window=2)
    assert len(probes_used(policy, probes("1", "2", "3", "3"))) == 2
    assert not decide_cot(policy, probes("1", "2", "3", "3")).stop


def test_sparse_then_dense_schedule() -> None:
    policy = CotPolicy(interval=64, early_interval=256, dense_from=1024)
    due = [p for p in range(64, 1600, 64) if probe_due(policy, p)]
    assert due == [256, 512, 768, 1024, 1088, 1152, 1216, 1280, 1344, 1408, 1472, 1536]
    assert not probe_due(policy, 0)


# --- first_stop and causality -----------------------------------------------------------------


def naive_first_stop(policy: CotPolicy, seq: list) -> int | None:
    """What the proxy does live: ask after every probe."""
    for i in range(len(seq)):
        if decide_cot(policy, seq[: i + 1]).stop:
            return i
    return None


def random_probes(rng: random.Random, n: int) -> list[ProbeObservation]:
    out, answer = [], "1"
    for i in range(n):
        if rng.random() < 0.3:
            answer = rng.choice(["1", "2", "3", None])
        signals = TextSignals(rng.random() < 0.2, rng.random(), rng.randint(0, 5),
                              rng.randint(0, 3))
        out.append(ProbeObservation((i + 1) * 64, answer, rng.random() < 0.1, 6, signals))
    return out


def random_policy(rng: random.Random) -> CotPolicy:
    rule = None
    if rng.random() < 0.5:
        rule = StopRule(features=FEATURES, weights=tuple(rng.gauss(0, 2) for _ in FEATURES),
                        bias=rng.gauss(0, 1), threshold=rng.choice([0.3, 0.5, 0.8]))
    return CotPolicy(interval=rng.choice([64, 128]), early_interval=rng.choice([None, 256]),
                     dense_from=rng.choice([0, 512]), window=rng.randint(1, 5),
                     agree_share=rng.choice([1.0, 0.75, 0.5]),
                     hesitation=rng.choice(["exclude", "veto", "ignore"]),
                     min_tokens=rng.choice([0, 256]), max_probes=rng.choice([None, 6]), rule=rule)


def test_first_stop_is_the_live_decision() -> None:
    rng = random.Random(7)
    for _ in range(300):
        policy, seq = random_policy(rng), random_probes(rng, rng.randint(0, 30))
        index, decision = first_stop(policy, seq)
        assert index == naive_first_stop(policy, seq)
        if index is not None:
            assert decision == decide_cot(policy, seq[: index + 1])


def test_decision_ignores_everything_after_the_stop() -> None:
    rng = random.Random(11)
    for _ in range(200):
        policy, seq = random_policy(rng), random_probes(rng, 30)
        index, decision = first_stop(policy, seq)
        if index is None:
            continue
        tail = random_probes(rng, 10)
        later = seq[: index + 1] + [ProbeObservation(p.position + seq[index].position, p.answer,
                                                      p.hesitant, p.tokens, p.signals)
                                    for p in tail]
        assert first_stop(policy, seq[: index + 1]) == (index, decision)
        assert first_stop(policy, later) == (index, decision)


def test_never_stopping_returns_none() -> None:
    index, decision = first_stop(PAPER_DEFAULT, probes("1", "2", "3", "4"))
    assert index is None and not decision.stop


# --- features and text signals ----------------------------------------------------------------


def test_features_from_the_probes_taken() -> None:
    seq = probes("5", "6", "6", "6")
    f = cot_features(seq)
    assert f["run_tokens"] == 128 / (128 + 1024)
    assert f["answer_share"] == 3 / 4
    assert f["distinct_answers"] == 2 / 6
    assert f["position"] == 256 / (256 + 4096)
    assert f["think_closed"] == 0.0 and f["answer_seen"] == 0.0
    assert set(f) == set(FEATURES)


def test_text_signals() -> None:
    text = "<think>Wait, x = 12. But I know butter. Let me check: 12 works.</think> so"
    s = text_signals(text, "12")
    assert s.think_closed
    assert s.seen_share == (len(text) - text.index("12")) / len(text)
    assert s.hesitations == 2  # "Wait", "But"; not "butter", and "know" holds no word
    assert s.verifications == 1
    assert not text_signals("x = 123 and 12.5 ", "12").seen_share  # not inside numbers
    assert text_signals("so x = 12. ", "12").seen_share == 4 / 11


def test_text_signals_wait_for_the_next_character() -> None:
    # The last word may still grow ("check" -> "checking"): it counts once it is closed.
    assert text_signals("let me check", None).verifications == 0
    assert text_signals("let me check ", None).verifications == 1
    assert text_signals("x = 12", "12").seen_share == 0.0
    assert text_signals("x = 12.", "12").seen_share == 0.0  # "12.5" may follow


# --- self-consistency ---------------------------------------------------------------------------


def test_decide_sc_branches() -> None:
    policy = ScPolicy(threshold=0.9, min_samples=3, max_samples=5)
    assert decide_sc(policy, ["1", "1"]).reason == "below min_samples"
    assert decide_sc(policy, ["1", "1", "1"]).stop
    d = decide_sc(policy, ["1", "2", "1"])
    assert not d.stop and "below threshold" in d.reason
    d = decide_sc(policy, ["1", "2", "3", "4", "1"])
    assert d.stop and d.reason == "max_samples reached" and d.answer == "1"


def test_decide_sc_uses_given_groups() -> None:
    policy = ScPolicy(threshold=1.0, min_samples=2)
    assert not decide_sc(policy, ["0.5", "\\frac{1}{2}"]).stop
    assert decide_sc(policy, ["0.5", "\\frac{1}{2}"], groups=[0, 0]).stop


def test_sc_answer_at_check() -> None:
    seq = [ProbeObservation(128, "3", False), ProbeObservation(256, "4", False)]
    assert sc_answer_at_check(ScPolicy(), seq, "9", 1000) == ("9", False)
    assert sc_answer_at_check(ScPolicy(check_tokens=300), seq, "9", 1000) == ("4", True)
    assert sc_answer_at_check(ScPolicy(check_tokens=300), seq, "9", 200) == ("9", False)
    assert sc_answer_at_check(ScPolicy(check_tokens=100), seq, "9", 1000) == (None, True)


def test_sc_policy_validates() -> None:
    with pytest.raises(ValueError):
        ScPolicy(min_samples=5, max_samples=3)
