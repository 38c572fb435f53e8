"""Text detectors shared by the proxy and the replay: what they find, and that they are causal."""

from __future__ import annotations

import random

import pytest

from dynasorctl.traces import PACKAGED_SAMPLE, load_cot
from proxy.core.text import (
    Statement,
    answer_statements,
    text_cut,
    think_end,
    token_position,
    transition_words,
)


def answers(text: str) -> list[str]:
    return [s.answer for s in answer_statements(text)]


@pytest.mark.parametrize(("text", "found"), [
    ("so the answer is 12. Next", ["12"]),
    ("Therefore, the answer is 180 degrees. ok", ["180"]),
    ("The answer is x = -4.\n", ["-4"]),
    ("the final answer is \\(\\frac{1}{4}\\).\n", ["\\frac{1}{4}"]),
    ("So the answer should be $2\\sqrt{3}$, right", ["2\\sqrt{3}"]),
    ("So the answer is 7 but let me check", ["7"]),
    ("the answer is correct. Next", []),  # a word, not an answer
    ("the answer is likely 4. Next", []),
    ("so the answer is 45?\n", []),  # a question: doubt
    ("the answer is 12", []),  # not decided yet: nothing says where it ends
    ("Answer: \\boxed{\\frac{1}{2}} done", ["\\frac{1}{2}"]),
    ("the answer is \\boxed{5}.\n", ["5"]),  # the boxed statement, counted once
    ("\\boxed{\\{1, 2\\}} and \\boxed{} and \\boxed{3", ["\\{1, 2\\}"]),  # empty, unclosed
    ("first \\boxed{1}, then the answer is 2.\n", ["1", "2"]),
])
def test_answer_statements(text: str, found: list[str]) -> None:
    assert answers(text) == found


def test_statement_offsets_say_where_it_is_decided() -> None:
    text = "so the answer is 12. Next"
    [s] = answer_statements(text)
    assert s == Statement(text.index("answer"), text.index(". ") + 2, "12")
    assert answer_statements(text[: s.end - 1]) == []  # the space after the full stop decides it


def test_think_end_reads_only_the_thinking() -> None:
    text = "<think>\nthe answer is 3.\n\\boxed{4}\n</think>\n\\boxed{5}"
    assert think_end(text) == (text.index("</think>") + len("</think>"), "4")
    assert think_end(text.replace("\\boxed{5}", "anything else")) == think_end(text)
    assert think_end(text[: text.index("</think>") + 7]) is None  # `</think` is not `</think>`
    assert think_end("<think>\nno answer here\n</think>\n\\boxed{5}")[1] is None  # type: ignore[index]


def test_transition_words_whole_words_any_case() -> None:
    text = "Wait, so. But wait: Waiting? await WAIT."
    assert transition_words(text, ["wait"]) == [0, 14, 35]
    assert transition_words(text, ["wait", "but"]) == [0, 10, 14, 35]
    assert transition_words("and then wait", ["wait"]) == []  # the next character decides it
    assert transition_words(text, []) == []


def test_token_positions_and_text_cuts_are_inverse() -> None:
    n, tokens = 1000, 377
    for offset in range(0, n + 1, 7):
        p = token_position(offset, n, tokens)
        assert text_cut(n, p, tokens) >= offset
        assert p == 0 or text_cut(n, p - 1, tokens) < offset


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [t.text for t in load_cot(PACKAGED_SAMPLE)]


def test_detectors_are_causal_on_real_texts(texts: list[str]) -> None:
    """On any prefix each detector finds what it finds on the whole text, decided by then."""
    rng = random.Random(13)
    assert sum(len(answer_statements(t)) for t in texts) > len(texts)  # they do find some
    for text in texts:
        full = answer_statements(text)
        waits = transition_words(text, ["wait"])
        for cut in sorted(rng.sample(range(len(text)), 25)) + [len(text)]:
            prefix = text[:cut]
            assert answer_statements(prefix) == [s for s in full if s.end <= cut]
            assert transition_words(prefix, ["wait"]) == [w for w in waits if w + 4 < cut]
