"""Self-consistency policies: when to stop adding samples to a program.

Two stopping rules over the answers read so far: the paper's entropy certaindex
(stop once 1 - H/log n reaches a threshold), and Adaptive-Consistency's Beta rule
(Aggarwal et al. 2023, "Let's Sample Step by Step"): stop once the probability that
the leading answer really is more likely than the runner-up, under a uniform prior on
their two shares, reaches a threshold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from math import comb
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy.core.certaindex import entropy_certaindex, group_by_normalized, group_sizes, majority
from proxy.core.observations import Decision, ProbeObservation


class ScPolicy(BaseModel):
    """Early stopping for self-consistency programs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal["entropy", "beta"] = Field(
        "entropy", description="entropy: certaindex 1 - H/log n (the paper); beta: the "
        "probability that the leading answer leads (Adaptive-Consistency)")
    threshold: float = Field(
        1.0, ge=0.0, le=1.0, description="stop adding samples once the rule's measure >= "
        "threshold"
    )
    check_tokens: int | None = Field(
        None, ge=1, description="read each sample's answer by a probe at this many tokens "
        "(samples that finished earlier give their final answer); unset: final answers"
    )
    min_samples: int = Field(2, ge=1, description="never fewer samples than this")
    max_samples: int = Field(8, ge=1, description="never more samples than this")

    @model_validator(mode="after")
    def _ordered(self) -> ScPolicy:
        if self.max_samples < self.min_samples:
            raise ValueError("max_samples is below min_samples")
        return self

    @property
    def version_2(self) -> bool:
        """Whether the policy uses a field policy file version 1 did not have."""
        return self.rule != "entropy"


def sc_answer_at_check(
    policy: ScPolicy,
    probes: Sequence[ProbeObservation],
    final_answer: str | None,
    completion_tokens: int,
) -> tuple[str | None, bool]:
    """One sample's answer when the policy checks it, and whether a probe was needed."""
    if policy.check_tokens is None or completion_tokens <= policy.check_tokens:
        return final_answer, False
    before = [p for p in probes if p.position <= policy.check_tokens]
    return (before[-1].answer if before else None), True


def leader_probability(leading: int, runner_up: int) -> float:
    """P(p1 > p2) for (p1, p2) ~ Dirichlet(leading + 1, runner_up + 1, ...) marginally Beta.

    With integer a, b, P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a), so the chance
    of exceeding 1/2 is that of fewer than a heads in a + b - 1 fair tosses: exact.
    """
    a, b = leading + 1, runner_up + 1
    n = a + b - 1
    return float(Fraction(sum(comb(n, k) for k in range(a)), 2**n))


def decide_sc(
    policy: ScPolicy, answers: Sequence[str | None], groups: Sequence[int] | None = None
) -> Decision:
    """Whether to stop adding samples, given the checked answers of the samples so far.

    `groups` are the answers' equivalence groups (the proxy's math-aware grouping);
    without them answers are grouped by normalized string.
    """
    n = len(answers)
    if n < policy.min_samples:
        return Decision(False, reason="below min_samples")
    groups = list(groups) if groups is not None else group_by_normalized(answers)
    answer = majority(answers, groups)
    if n >= policy.max_samples:
        return Decision(True, answer=answer, reason="max_samples reached")
    if policy.rule == "beta":
        counts = Counter(g for a, g in zip(answers, groups) if a is not None).most_common(2)
        if not counts:
            return Decision(False, reason="no answer yet")
        second = counts[1][1] if len(counts) > 1 else 0
        measure, name = leader_probability(counts[0][1], second), "leader probability"
    else:
        measure, name = entropy_certaindex(group_sizes(groups)), "certaindex"
    if measure >= policy.threshold:
        return Decision(True, answer=answer, reason=f"{name} {measure:.2f}")
    return Decision(False, reason=f"{name} {measure:.2f} below threshold")
