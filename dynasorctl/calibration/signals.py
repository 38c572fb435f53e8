"""One recorded run as the causal sequence of observations the decision function reads.

The probes and trials are recorded; the statements and the end of thinking are read
from the recorded text by the proxy's own detectors (`proxy.core.text`), their
character offsets mapped to token positions proportionally (no tokenizer at hand).
Statements count inside the thinking only; text events at or past the end of the run
are left out, like recorded probes there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dynasorctl.calibration.observed import ObservedRun
from proxy.core.policy import (
    Observation,
    ProbeObservation,
    StatementObservation,
    ThinkEndObservation,
    in_causal_order,
)
from proxy.core.text import THINK_END, answer_statements, think_end, token_position


@dataclass(frozen=True, slots=True)
class TextEvents:
    """What the text of one run says, at token positions."""

    statements: tuple[StatementObservation, ...] = ()
    think_end: ThinkEndObservation | None = None


def text_events(run: ObservedRun) -> TextEvents:
    """The run's answer statements in the thinking and its end of thinking (none without text)."""
    text = run.text
    if not text:
        return TextEvents()
    n, tokens = len(text), run.main_tokens
    found = answer_statements(text)
    end = text.find(THINK_END)
    inside = found if end < 0 else [s for s in found if s.end <= end]
    statements = tuple(
        StatementObservation(p, s.answer) for s in inside
        if (p := token_position(s.end, n, tokens)) < tokens)
    closed = think_end(text, found)
    think = None
    if closed is not None and (p := token_position(closed[0], n, tokens)) < tokens:
        think = ThinkEndObservation(p, closed[1])
    return TextEvents(statements, think)


def observations(run: ObservedRun, probes: Sequence[ProbeObservation] | None = None,
                 events: TextEvents | None = None) -> list[Observation]:
    """Everything a policy could observe along the run, in causal order.

    `probes`: the run's probes as the decision should see them (with text signals);
    default the recorded ones. `events`: the run's `text_events`, when already read.
    """
    events = text_events(run) if events is None else events
    seq: list[Observation] = [*(run.probes if probes is None else probes), *events.statements,
                              *(run.trials or ())]
    if events.think_end is not None:
        seq.append(events.think_end)
    return in_causal_order(seq)
