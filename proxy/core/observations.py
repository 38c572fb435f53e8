"""What a policy observes along one chain-of-thought request, and what it decides.

Observations arrive in causal order: each is at a main-token position and depends
only on the text generated up to it. At one position they come in the order of
`CAUSAL_RANK` (a statement, then the probe it may trigger, then a trial, then the
end of thinking), so the live proxy and the replay agree on ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.core.text import TextSignals

Source = Literal["probe", "trial", "text"]


@dataclass(frozen=True, slots=True)
class ProbeObservation:
    """One probe: what the model answered when forced to answer at `position`.

    A trial (`trial=True`) is a probe taken at a transition word with the transition
    trigger's settings (DEER: the inducer, greedy, logprobs); any other probe was taken
    with the policy's probe settings, on the periodic schedule or after a statement.
    """

    position: int  # main-stream tokens generated when the probe was taken
    answer: str | None
    hesitant: bool
    tokens: int = 0  # tokens the probe decoded
    signals: TextSignals | None = None  # None: the text was not available
    confidence: float | None = None  # mean token probability of the answer; None: unmeasured
    trial: bool = False


@dataclass(frozen=True, slots=True)
class StatementObservation:
    """The text stated an answer (`\\boxed{12}`, "the answer is 12") inside the thinking."""

    position: int  # main tokens when the statement was complete
    answer: str


@dataclass(frozen=True, slots=True)
class ThinkEndObservation:
    """`</think>` was written; `answer` is the last answer stated before it, if any."""

    position: int  # main tokens when `</think>` was complete
    answer: str | None


Observation = ProbeObservation | StatementObservation | ThinkEndObservation


def causal_rank(o: Observation) -> int:
    """Order of observations at one position: statement, probe, trial, end of thinking."""
    if isinstance(o, StatementObservation):
        return 0
    if isinstance(o, ProbeObservation):
        return 2 if o.trial else 1
    return 3


def causal_key(o: Observation) -> tuple[int, int]:
    return o.position, causal_rank(o)


def in_causal_order(observations: Sequence[Observation]) -> list[Observation]:
    """The observations sorted causally (stable: equal keys keep their order)."""
    return sorted(observations, key=causal_key)


@dataclass(frozen=True, slots=True)
class Decision:
    stop: bool
    answer: str | None = None
    reason: str = ""
    source: Source | None = None  # where a stop's answer came from


@dataclass(slots=True)
class StopInfo:
    """What a policy decided for one request: where, with which answer."""

    position: int
    answer: str | None
    reason: str
    source: Source = "probe"
