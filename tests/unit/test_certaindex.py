"""Pure certaindex pieces: answer extraction, hesitation words, entropy, agreement."""

from __future__ import annotations

import math

import pytest

from proxy.core.certaindex import (
    close_brace,
    entropy_certaindex,
    extract_boxed,
    group_by_normalized,
    group_sizes,
    is_hesitant,
    majority,
    normalize_answer,
    probe_answer,
    probe_certaindex,
)


@pytest.mark.parametrize(
    ("output", "answer"),
    [
        ("42}", "42"),
        ("\\frac{1}{2}} and more", "\\frac{1}{2}"),
        ("  7 }\\]", "7"),
        ("\\sqrt{2", "\\sqrt{2"),  # never closed: all of it
        ("}", None),
        ("", None),
    ],
)
def test_probe_answer_reads_balanced_braces(output, answer):
    assert probe_answer(output) == answer


def test_close_brace_reports_whether_it_closed():
    assert close_brace("a{b}c}d") == ("a{b}c", True)
    assert close_brace("a{b") == ("a{b", False)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {x^{2}}", "x^{2}"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
        ("\\fbox{5}", "5"),
    ],
)
def test_extract_boxed_takes_the_last_balanced_box(text, answer):
    assert extract_boxed(text) == answer


@pytest.mark.parametrize(
    ("text", "hesitant"),
    [
        ("I know the answer", False),  # "no" inside "know"
        ("nothing but 5", True),
        ("Wait, 5", True),
        ("HMM.", True),
        ("okay", True),
        ("butter and notation", False),
        ("42}", False),
        ("no.", True),
    ],
)
def test_hesitation_matches_whole_words_only(text, hesitant):
    assert is_hesitant(text) is hesitant


def test_custom_hesitation_words():
    assert is_hesitant("let me double-check", ["double-check"])
    assert not is_hesitant("wait", ["maybe"])


@pytest.mark.parametrize(
    ("a", "b"),
    [("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\left(1, 2\\right)", "(1,2)"), ("90^\\circ", "90"),
     ("\\text{(C)}", "(C)"), ("5.", "5"), ("10\\%", "10")],
)
def test_normalize_folds_surface_differences(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_keeps_real_differences():
    assert normalize_answer("12") != normalize_answer("1.2")
    assert normalize_answer("") is None and normalize_answer(None) is None


def test_entropy_certaindex_bounds_and_known_values():
    assert entropy_certaindex([8]) == 1.0
    assert entropy_certaindex([1] * 8) == pytest.approx(0.0)
    assert entropy_certaindex([1]) == 0.0  # one sample: no evidence
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy_certaindex([3, 1]) == pytest.approx(1 - h / math.log(4))


def test_grouping_majority_and_missing_answers():
    answers = ["2", "\\dfrac{4}{2}", "2", None, None, "3"]
    groups = group_by_normalized(answers)
    assert groups[0] == groups[2] and groups[3] != groups[4]
    assert sorted(group_sizes(groups)) == [1, 1, 1, 1, 2]
    assert majority(answers, groups) == "2"
    assert majority([None], [0]) is None


def test_probe_certaindex_is_window_agreement_without_hesitant_probes():
    assert probe_certaindex(["5", "5", "5"], [False] * 3) == 1.0
    assert probe_certaindex(["5", "5", "6"], [False] * 3) == pytest.approx(2 / 3)
    # the hesitant "5" is left out: "6" and "5" disagree
    assert probe_certaindex(["6", "5", "5"], [False, True, False]) == pytest.approx(1 / 3)
    assert probe_certaindex(["5"], [False]) == pytest.approx(1 / 3)
    assert probe_certaindex([None, None], [False, False]) == 0.0
