"""The growing text the proxy watches: the incremental readers find exactly what the
whole-text detectors find, at the token positions the replay maps them to."""

from __future__ import annotations

import random

import pytest

from dynasorctl.traces import PACKAGED_SAMPLE, load_cot
from proxy.core.live_text import LiveText, StatementReader, ThinkEndReader, TransitionReader
from proxy.core.text import answer_statements, think_end, token_position, transition_words
from proxy.pipeline.dialect import assistant_prefix

TRACES = load_cot(PACKAGED_SAMPLE)


def _pieces(text: str, tokens: int) -> list[str]:
    n = len(text)
    return [text[n * i // tokens: n * (i + 1) // tokens] for i in range(tokens)]


def _grow(pieces: list[str], every: int, words=("wait",)):
    """Feed `pieces` a token at a time; read every `every` tokens (and at the end)."""
    live, said, turns, end = LiveText(), StatementReader(), TransitionReader(words), ThinkEndReader()
    statements, offsets, closed = [], [], None
    for i, piece in enumerate(pieces, 1):
        live.add(piece)
        if i % every == 0 or i == len(pieces):
            statements += [(s, live.position(s.end)) for s in said.read(live.text())]
            offsets += transition_reader_read(turns, live)
            found = end.read(live)
            if found is not None:
                closed = (found, live.position(found[0]))
    return live, statements, offsets, closed


def transition_reader_read(reader: TransitionReader, live: LiveText) -> list[int]:
    before = reader.bound(live)
    found = reader.read(live)
    assert all(live.position(at) >= before for at in found)  # the bound held
    return found


@pytest.mark.parametrize("every", [1, 7, 64])
def test_readers_find_what_the_whole_text_detectors_find_at_proportional_positions(every):
    for trace in TRACES:
        text, tokens = trace.text, trace.completion_tokens
        live, statements, offsets, closed = _grow(_pieces(text, tokens), every)
        assert live.text() == text
        whole = answer_statements(text)
        assert [s for s, _ in statements] == whole, trace.trace_id
        # Each position is where the replay maps the statement (proportional pieces).
        assert [p for _, p in statements] == [token_position(s.end, len(text), tokens) for s in whole]
        assert offsets == transition_words(text, ["wait"])
        expected = think_end(text)
        assert (closed[0] if closed else None) == expected
        if expected is not None:
            assert closed[1] == token_position(expected[0], len(text), tokens)


def test_readers_hold_on_random_cuts_and_long_open_boxes():
    rng = random.Random(7)
    filler = "x" * 3000
    text = ("Let me think. Wait, the answer is 12. " + filler + " so \\boxed{\\frac{1}{" + filler
            + "2}} and wait\u00a0again, the answer is 5.\n</think>\n\nDone \\boxed{5}.")
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 300))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        _, statements, offsets, closed = _grow(pieces, rng.choice([1, 3, 50]))
        assert [s for s, _ in statements] == answer_statements(text)
        assert offsets == transition_words(text, ["wait"])
        assert closed is not None and closed[0] == think_end(text)


def test_reasoning_in_its_own_field_reads_as_the_probes_continue_it():
    live, end = LiveText(), ThinkEndReader()
    reasoning = ["Wait", ", so the answer is 7", ".", " Hmm"]
    for r in reasoning:
        live.add("", r)
        assert end.read(live) is None
    live.add("\n\nThe", "")
    found = end.read(live)
    expected = assistant_prefix("".join(reasoning), "\n\nThe")
    assert live.text() == expected
    assert found == think_end(expected) and found[1] == "7"
    assert live.position(found[0]) == 5  # the first content token closes the thinking
    assert live.position(0) == 0 and live.position(1) == 1


def test_position_maps_offsets_to_the_token_that_wrote_them():
    live = LiveText()
    for piece in ["ab", "", "cde", "f"]:
        live.add(piece)
    assert [live.position(i) for i in range(7)] == [0, 1, 1, 3, 3, 3, 4]
    assert live.tail(1) == (5, "f") and live.tail(2) == (2, "cdef")
