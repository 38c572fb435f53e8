"""The vectorised replay is the proxy's decision: same stops, same answers, same signals."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from dynasorctl.calibration.observed import ObservedRun, load_observations
from dynasorctl.calibration.replay import Replayer
from dynasorctl.calibration.table import (
    build_table,
    first_answer_start,
    signal_word_spans,
    text_cut,
)
from dynasorctl.traces import PACKAGED_SAMPLE
from proxy.core.certaindex import normalize_answer
from proxy.core.policy import (
    FEATURES,
    HESITATION_RE,
    VERIFICATION_RE,
    CotPolicy,
    ProbeObservation,
    StopRule,
    answer_pattern,
    decide_cot,
    first_stop,
    text_signals,
)


@pytest.fixture(scope="module")
def sample() -> list[ObservedRun]:
    return load_observations([PACKAGED_SAMPLE])  # type: ignore[return-value]


@pytest.fixture(scope="module")
def replayer(sample: list[ObservedRun]) -> Replayer:
    return Replayer(build_table(sample))


def random_policy(rng: random.Random) -> CotPolicy:
    rule = None
    if rng.random() < 0.4:
        rule = StopRule(features=FEATURES, weights=tuple(rng.gauss(0, 3) for _ in FEATURES),
                        bias=rng.gauss(0, 1), threshold=rng.choice([0.3, 0.5, 0.8, 0.95]))
    return CotPolicy(
        interval=rng.choice([64, 128, 256]), early_interval=rng.choice([None, None, 256, 512]),
        dense_from=rng.choice([0, 1024, 2048]), window=rng.choice([1, 2, 3, 4, 6, 8]),
        agree_share=rng.choice([1.0, 1.0, 0.75, 0.6, 0.5]),
        hesitation=rng.choice(["exclude", "veto", "ignore"]),
        min_tokens=rng.choice([0, 512, 1024]), max_probes=rng.choice([None, None, 4, 20]),
        rule=rule)


@pytest.fixture(scope="module")
def live_probes(sample: list[ObservedRun]) -> list[list[ProbeObservation]]:
    """What the proxy records: each probe with the signals of the text generated so far."""
    out = []
    for run in sample:
        assert run.text is not None
        out.append([
            ProbeObservation(p.position, p.answer, p.hesitant, p.tokens, text_signals(
                run.text[: text_cut(len(run.text), p.position, run.main_tokens)], p.answer))
            for p in run.probes])
    return out


def live(policy: CotPolicy, probes: list[ProbeObservation]) -> tuple[int | None, str | None]:
    """The proxy's loop: after each probe, decide on everything seen so far."""
    for i in range(len(probes)):
        decision = decide_cot(policy, probes[: i + 1])
        if decision.stop:
            return i, decision.answer
    return None, None


def test_replay_equals_live_decisions(live_probes: list[list[ProbeObservation]],
                                      replayer: Replayer) -> None:
    rng = random.Random(5)
    t = replayer.t
    for _ in range(60):
        policy = random_policy(rng)
        stops = replayer.stops(policy)
        for r, probes in enumerate(live_probes):
            index, answer = live(policy, probes)
            want_row = -1 if index is None else int(t.run_start[r]) + index
            assert stops.row[r] == want_row, (policy, t.runs[r].run_id)
            if index is not None:
                assert normalize_answer(t.key_answer[stops.key[r]]) == normalize_answer(answer)


def test_table_signals_are_text_signals(live_probes: list[list[ProbeObservation]],
                                        replayer: Replayer) -> None:
    for r, probes in enumerate(live_probes):
        assert list(replayer.t.probes(r)) == probes


def test_replay_counts_the_probes_taken(sample: list[ObservedRun], replayer: Replayer) -> None:
    policy = CotPolicy(interval=128, window=4, max_probes=30)
    stops = replayer.stops(policy)
    for r in range(len(sample)):
        probes = replayer.t.probes(r)
        index, _ = first_stop(policy, probes)
        taken = [p for p in (probes if index is None else probes[: index + 1])
                 if p.position % 128 == 0][:30]
        assert stops.probes[r] == len(taken)
        assert stops.decoded[r] == sum(p.tokens for p in taken)
        assert stops.cost[r] == sum(p.tokens + 8 for p in taken)


def test_answer_search_matches_the_pattern() -> None:
    rng = random.Random(3)
    alphabet = "12.5 x=\n,{}()ab_\\frac"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        answer = rng.choice(["1", "12", "2.5", "a", "\\frac{1}{2}", "(1,2)"])
        match = answer_pattern(answer).search(text)
        found = first_answer_start(text, answer)
        assert (found[0] if found else None) == (match.start() if match else None)
        if found:  # the prefix that first holds it
            end = found[0] + len(answer) + found[1]
            assert answer_pattern(answer).search(text[:end])
            assert not answer_pattern(answer).search(text[: end - 1])


@pytest.mark.parametrize("text", [
    "Wait, WAIT. but-butter Hmmm, hmm hmmx. Let me CHECK, re-check; verified? rechecking ",
    "So \u212aelvin: wait, check it, Wait",  # a character whose lower case is ASCII
    "wait",  # not closed yet
])
def test_word_spans_match_the_patterns(text: str) -> None:
    (hs, he), (vs, ve) = signal_word_spans(text)
    assert list(zip(hs, he)) == [m.span() for m in HESITATION_RE.finditer(text)]
    assert list(zip(vs, ve)) == [m.span() for m in VERIFICATION_RE.finditer(text)]


def test_runs_without_probes_never_stop() -> None:
    runs = [ObservedRun("a", "g", "m", (), "1", 100), ObservedRun("b", "g", "m", (), "2", 50)]
    stops = Replayer(build_table(runs)).stops(CotPolicy())
    assert stops.row.tolist() == [-1, -1] and stops.probes.tolist() == [0, 0]


def test_runs_without_text_have_no_signals() -> None:
    run = ObservedRun("r", "g", "m", (ProbeObservation(64, "1", False),), "1", 100)
    t = build_table([run])
    assert t.probes(0)[0].signals is None
    assert t.seen[0] == 0.0 and t.hesitations[0] == 0


def test_table_layout() -> None:
    runs = [
        ObservedRun("a", "g1", "m", (ProbeObservation(64, "1", False, 3),
                                     ProbeObservation(128, "\\frac12", True, 4),
                                     ProbeObservation(192, None, False, 5)), "\\frac12", 200),
        ObservedRun("b", "g2", "m", (), "7", 50),
    ]
    t = build_table(runs)
    assert t.run_start.tolist() == [0, 3, 3]
    assert t.run_of.tolist() == [0, 0, 0]
    assert t.key.tolist() == [0, 1, -1]
    assert t.final_key.tolist() == [1, -1]
    assert t.cost.tolist() == [11, 12, 13]
    assert t.hesitant.tolist() == [False, True, False]
    assert np.array_equal(t.main_tokens, [200, 50])


def test_strict_majority_is_required_for_the_fast_path(replayer: Replayer) -> None:
    # A 2-of-4 window can tie; that rule goes through first_stop itself.
    policy = CotPolicy(window=4, agree_share=0.5)
    stops = replayer.stops(policy)
    for r in range(replayer.t.n_runs):
        index, _ = first_stop(policy, replayer.t.probes(r))
        assert stops.row[r] == (-1 if index is None else replayer.t.run_start[r] + index)


def test_hesitation_pattern_is_whole_words() -> None:
    assert not re.search(HESITATION_RE, "I know nothing. ")
