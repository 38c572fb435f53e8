"""Chain-of-thought policies: when to probe (the triggers), how, and when to stop.

A policy combines up to four triggers, each a field, each able to stop the request:

- periodic probes every `interval` tokens, stopping when a window of them agrees (the
  paper's rule and kin; version 1 policy files hold only this);
- `statement`: a probe after the thinking states an answer ("so the answer is 12",
  `\\boxed{12}`), stopping when the probe gives that answer;
- `transition`: a trial at a transition word such as "Wait" (DEER), stopping on a
  confident answer;
- `think_end`: at `</think>`, stopping with the last answer written in the thinking
  (the summary after it is not generated).

Each probe kind carries its own settings, so the proxy probes exactly as the data the
policy was calibrated on was recorded.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Features a learned rule may use, each in [0, 1], computed by `decide.cot_features`. Only
# + - * / go into them, so the vectorised replay computes bit-identical values.
FEATURES: tuple[str, ...] = (
    "run_tokens",  # tokens the current answer has been given without a break, r / (r + 1024)
    "answer_share",  # share of the probes so far that gave the current answer
    "distinct_answers",  # distinct answers so far, d / (d + 4)
    "position",  # main tokens so far, p / (p + 4096)
    "think_closed",  # 1 once `</think>` is in the text
    "answer_seen",  # share of the text written since the answer first appeared in it
    "hesitations",  # hesitation words in the recent text, h / (h + 2)
    "verifications",  # verification words in the recent text, v / (v + 2)
)
Feature = Literal[
    "run_tokens", "answer_share", "distinct_answers", "position",
    "think_closed", "answer_seen", "hesitations", "verifications",
]

Confidence = float  # mean token probability of a probe's answer, in (0, 1]


class StopRule(BaseModel):
    """A learned gate: stop only when sigmoid(bias + weights . features) >= threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[Feature, ...] = Field(description="feature names, in the order of weights")
    weights: tuple[float, ...] = Field(description="one weight per feature")
    bias: float = Field(0.0, description="the logistic model's intercept")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="probability needed to stop")

    @model_validator(mode="after")
    def _aligned(self) -> StopRule:
        if len(self.features) != len(self.weights):
            raise ValueError(f"{len(self.features)} features but {len(self.weights)} weights")
        if len(set(self.features)) != len(self.features):
            raise ValueError("a feature is listed twice")
        return self

    @property
    def logit_threshold(self) -> float:
        return math.log(self.threshold / (1.0 - self.threshold))

    def score(self, features: dict[str, float]) -> float:
        """The rule's logit for these feature values (summed in the stored order)."""
        z = self.bias
        for name, weight in zip(self.features, self.weights):
            z = z + weight * features[name]
        return z


class ProbeSettings(BaseModel):
    """How a probe is taken. An unset field takes the proxy's own setting (`probe_*`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suffix: str | None = Field(
        None, description="text appended to the text so far; the answer is decoded after it")
    temperature: float | None = Field(None, ge=0.0, description="sampling temperature")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling")
    max_tokens: int | None = Field(None, ge=1, description="most tokens the probe decodes")
    logprobs: bool = Field(
        False, description="ask for logprobs: the answer's mean token probability (after the "
        "opening brace, the closing brace included) is the probe's confidence")


# DEER's trials (Yang et al. 2025), as the shared trial data were recorded: the inducer
# ends with `\boxed`, so the trial decodes the opening brace, the answer and the closing one.
TRIAL_SETTINGS = ProbeSettings(suffix="\n**Final Answer**\n\\boxed", temperature=0.0,
                               top_p=1.0, max_tokens=20, logprobs=True)


def _confidence(description: str) -> object:
    return Field(None, gt=0.0, le=1.0, description=description)


class StatementTrigger(BaseModel):
    """Probe when the thinking states an answer; stop when the probe gives that answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    align: int = Field(64, ge=1, description="the probe is taken at the next multiple of "
                       "`align` main tokens at or after the statement")
    new_answers_only: bool = Field(
        True, description="only a statement of an answer not stated before triggers a probe")
    min_confidence: Confidence | None = _confidence(  # type: ignore[assignment]
        "optional: the confirming probe must be at least this confident")


class TransitionTrigger(BaseModel):
    """Trials at transition words (DEER): stop on a confident answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    words: tuple[str, ...] = Field(
        ("wait",), min_length=1,
        description="transition words (whole words, any case); a trial continues the text "
        "before the word")
    max_trials: int = Field(30, ge=1, description="trials at the first this many words only")
    min_confidence: Confidence | None = _confidence(  # type: ignore[assignment]
        "stop when a trial's confidence reaches this (DEER's threshold)")
    agree: int | None = Field(
        None, ge=2, description="or stop when this many trials in a row give one answer...")
    agree_confidence: Confidence | None = _confidence(  # type: ignore[assignment]
        "...each at least this confident")
    probe: ProbeSettings = Field(TRIAL_SETTINGS, description="how trials are taken")

    @model_validator(mode="after")
    def _can_stop(self) -> TransitionTrigger:
        if self.min_confidence is None and self.agree is None:
            raise ValueError("set min_confidence, agree, or both: otherwise trials never stop")
        if (self.agree is None) != (self.agree_confidence is None):
            raise ValueError("agree and agree_confidence go together")
        if any(not w.strip() for w in self.words):
            raise ValueError("a transition word is empty")
        if not self.probe.logprobs and (self.min_confidence or self.agree_confidence):
            raise ValueError("a confidence threshold needs probe.logprobs = true")
        return self


class CotPolicy(BaseModel):
    """Early stopping for long chain-of-thought: the paper's probe agreement and newer signals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    periodic: bool = Field(True, description="take probes every `interval` tokens and stop "
                           "when `window` of them agree (false: no periodic probes)")
    interval: int = Field(64, ge=1, description="use a probe every `interval` tokens")
    early_interval: int | None = Field(
        None, ge=1, description="before `dense_from` tokens, probe every `early_interval` instead"
    )
    dense_from: int = Field(0, ge=0, description="where the (denser) `interval` schedule starts")
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
    min_confidence: Confidence | None = _confidence(  # type: ignore[assignment]
        "optional: the newest probe of an agreeing window must be at least this confident")
    rule: StopRule | None = Field(None, description="an optional learned gate on the stop")
    probe: ProbeSettings | None = Field(
        None, description="how periodic and statement probes are taken (unset: the proxy's)")
    statement: StatementTrigger | None = Field(
        None, description="probe when the thinking states an answer")
    transition: TransitionTrigger | None = Field(
        None, description="trials at transition words (DEER)")
    think_end: bool = Field(
        False, description="at `</think>`, stop with the last answer stated in the thinking")

    @model_validator(mode="after")
    def _can_stop(self) -> CotPolicy:
        if not (self.periodic or self.statement or self.transition or self.think_end):
            raise ValueError("no trigger is on (periodic = false and no statement, transition "
                             "or think_end): the policy could never stop")
        return self

    @property
    def version_2(self) -> bool:
        """Whether the policy uses a field policy file version 1 did not have."""
        return bool(not self.periodic or self.min_confidence is not None or self.probe
                    or self.statement or self.transition or self.think_end)

    @property
    def triggers(self) -> frozenset[str]:
        """The triggers the policy uses: periodic, statement, transition, think_end."""
        on = {"periodic": self.periodic, "statement": self.statement is not None,
              "transition": self.transition is not None, "think_end": self.think_end}
        return frozenset(name for name, used in on.items() if used)


PAPER_DEFAULT = CotPolicy()
