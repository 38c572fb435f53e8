"""Stopping policies and the one decision function every stage shares.

The proxy (live), `dynasorctl calibrate` and `dynasorctl evaluate` (replay) all
call `decide_cot` on the same observations, so a replayed decision is the live
decision by construction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from proxy.certaindex import normalize_answer


@dataclass(frozen=True, slots=True)
class ProbeObservation:
    """One probe: what the model answered when forced to answer at `position`."""

    position: int  # main-stream tokens generated when the probe was taken
    answer: str | None
    hesitant: bool
    tokens: int = 0  # tokens the probe decoded


@dataclass(frozen=True, slots=True)
class Decision:
    stop: bool
    answer: str | None = None
    reason: str = ""


class CotPolicy(BaseModel):
    """Probe-consistency early stopping for long chain-of-thought (the paper's rule and kin)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: int = Field(64, ge=1, description="use a probe every `interval` tokens")
    window: int = Field(3, ge=1, description="how many recent probes must agree")
    agree_share: float = Field(
        1.0, gt=0.0, le=1.0, description="share of the window that must give the same answer"
    )
    hesitation: Literal["exclude", "veto", "ignore"] = Field(
        "exclude",
        description="hesitant probes are left out of the window (paper), veto a stop "
        "(reference code), or count like any other",
    )
    min_tokens: int = Field(0, ge=0, description="no stop before this many main tokens")
    max_probes: int | None = Field(None, ge=1, description="stop probing after this many")


PAPER_DEFAULT = CotPolicy()


def probes_used(policy: CotPolicy, probes: Sequence[ProbeObservation]) -> list[ProbeObservation]:
    """The probes the policy takes: those on its interval, capped at `max_probes`."""
    used = [p for p in probes if p.position % policy.interval == 0]
    if policy.max_probes is not None:
        used = used[: policy.max_probes]
    return used


def decide_cot(policy: CotPolicy, probes: Sequence[ProbeObservation]) -> Decision:
    """Whether to stop now, given every probe observed so far (oldest first)."""
    used = probes_used(policy, probes)
    if not used:
        return Decision(False, reason="no probe yet")
    if used[-1].position < policy.min_tokens:
        return Decision(False, reason="before min_tokens")
    if policy.hesitation == "exclude":
        window = [p for p in used if not p.hesitant][-policy.window :]
    else:
        window = used[-policy.window :]
    if len(window) < policy.window:
        return Decision(False, reason="window not full")
    if policy.hesitation == "veto" and any(p.hesitant for p in window):
        return Decision(False, reason="hesitant probe in window")
    keys = [normalize_answer(p.answer) for p in window]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return Decision(False, reason="no answers in window")
    key, votes = counts.most_common(1)[0]
    if votes < policy.agree_share * policy.window:
        return Decision(False, reason="answers disagree")
    answer = next(p.answer for p in reversed(window) if normalize_answer(p.answer) == key)
    return Decision(True, answer=answer, reason=f"{votes}/{policy.window} probes agree")


def first_stop(
    policy: CotPolicy, probes: Sequence[ProbeObservation]
) -> tuple[int | None, Decision]:
    """Replay probes in order; the index of the probe at which the policy stops (or None)."""
    for i in range(len(probes)):
        decision = decide_cot(policy, probes[: i + 1])
        if decision.stop:
            return i, decision
    return None, Decision(False, reason="never stopped")
