"""Stopping policies and the one decision function every stage shares.

The proxy (live), `dynasorctl calibrate` and `dynasorctl evaluate` (replay) all
call `decide_cot` / `decide_sc` on the same observations, so a replayed decision
is the live decision by construction. Policy files (TOML, `PolicyFile`) are read
here too, so the proxy loads them without the operator's tooling.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from proxy.core.certaindex import (
    entropy_certaindex,
    group_by_normalized,
    group_sizes,
    majority,
    normalize_answer,
)

# --- what a probe observed -------------------------------------------------------------------

# Text signals look at this many characters before the probe (about 500 tokens).
RECENT_CHARS = 2000
THINK_END = "</think>"
# Whole words only (ASCII letters), and only once the character after the word has been
# generated, so that the count over a prefix of the text never depends on what follows it.
HESITATION_WORDS = ("wait", "hmm+", "but", "alternatively", "however", "actually", "mistake",
                    "wrong")
VERIFICATION_WORDS = ("check", "checking", "checked", "verify", "verifying", "verified",
                      "verification", "confirm", "confirms", "confirmed", "recheck", "sanity")


def _words(words: Sequence[str]) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z])(?:{'|'.join(words)})(?=[^A-Za-z])",
                      re.IGNORECASE | re.ASCII)


HESITATION_RE = _words(HESITATION_WORDS)
VERIFICATION_RE = _words(VERIFICATION_WORDS)


def answer_pattern(answer: str) -> re.Pattern[str]:
    """The probe answer as written in the text: not inside a longer number or word.

    A full stop may follow ("x = 12.") but not start a decimal ("12.5"); either way
    the characters that decide it must already be written.
    """
    return re.compile(rf"(?<![\w.]){re.escape(answer)}(?=[^\w.]|\.[^\w])")


@dataclass(frozen=True, slots=True)
class TextSignals:
    """What the generated text so far says at a probe (all causal: prefix only)."""

    think_closed: bool = False  # `</think>` already written
    seen_share: float = 0.0  # share of the text written since the probe answer first appeared
    hesitations: int = 0  # hesitation words in the last RECENT_CHARS characters
    verifications: int = 0  # verification words in the last RECENT_CHARS characters


def text_signals(text: str, answer: str | None) -> TextSignals:
    """Signals of the text generated so far, for the probe that answered `answer`."""
    n = len(text)
    seen = 0.0
    if answer and n:
        match = answer_pattern(answer).search(text)
        if match is not None:
            seen = (n - match.start()) / n
    start = max(0, n - RECENT_CHARS)
    return TextSignals(
        think_closed=THINK_END in text,
        seen_share=seen,
        hesitations=sum(1 for _ in HESITATION_RE.finditer(text, start)),
        verifications=sum(1 for _ in VERIFICATION_RE.finditer(text, start)),
    )


@dataclass(frozen=True, slots=True)
class ProbeObservation:
    """One probe: what the model answered when forced to answer at `position`."""

    position: int  # main-stream tokens generated when the probe was taken
    answer: str | None
    hesitant: bool
    tokens: int = 0  # tokens the probe decoded
    signals: TextSignals | None = None  # None: the text was not available


@dataclass(frozen=True, slots=True)
class Decision:
    stop: bool
    answer: str | None = None
    reason: str = ""


@dataclass(slots=True)
class StopInfo:
    """What a policy decided for one request: where, with which answer."""

    position: int
    answer: str | None
    reason: str



# --- chain-of-thought policies ---------------------------------------------------------------

# Features a learned rule may use, each in [0, 1], computed by `cot_features`. Only + - * /
# go into them, so the vectorised replay computes bit-identical values.
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


class CotPolicy(BaseModel):
    """Probe-consistency early stopping for long chain-of-thought (the paper's rule and kin)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    rule: StopRule | None = Field(None, description="an optional learned gate on the stop")


PAPER_DEFAULT = CotPolicy()


def probe_due(policy: CotPolicy, position: int) -> bool:
    """Whether the policy wants a probe at `position` main tokens (ignoring `max_probes`)."""
    if position <= 0:
        return False
    if policy.early_interval is not None and position < policy.dense_from:
        return position % policy.early_interval == 0
    return position % policy.interval == 0


def probes_used(policy: CotPolicy, probes: Sequence[ProbeObservation]) -> list[ProbeObservation]:
    """The probes the policy takes: those on its schedule, capped at `max_probes`."""
    used = [p for p in probes if probe_due(policy, p.position)]
    if policy.max_probes is not None:
        used = used[: policy.max_probes]
    return used


def cot_features(used: Sequence[ProbeObservation]) -> dict[str, float]:
    """The learned rule's features after the probes the policy took (oldest first)."""
    last = used[-1]
    key = normalize_answer(last.answer)
    run_start = last.position
    if key is not None:
        for p in reversed(used[:-1]):
            if normalize_answer(p.answer) != key:
                break
            run_start = p.position
    keys = [normalize_answer(p.answer) for p in used]
    same = sum(1 for k in keys if k == key) if key is not None else 0
    distinct = len({k for k in keys if k is not None})
    run = last.position - run_start
    s = last.signals or TextSignals()
    return {
        "run_tokens": run / (run + 1024),
        "answer_share": same / len(used),
        "distinct_answers": distinct / (distinct + 4),
        "position": last.position / (last.position + 4096),
        "think_closed": 1.0 if s.think_closed else 0.0,
        "answer_seen": s.seen_share,
        "hesitations": s.hesitations / (s.hesitations + 2),
        "verifications": s.verifications / (s.verifications + 2),
    }


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
    if policy.rule is not None and policy.rule.score(cot_features(used)) < (
        policy.rule.logit_threshold
    ):
        return Decision(False, reason="learned rule not confident")
    answer = next(p.answer for p in reversed(window) if normalize_answer(p.answer) == key)
    return Decision(True, answer=answer, reason=f"{votes}/{policy.window} probes agree")


def first_stop(
    policy: CotPolicy, probes: Sequence[ProbeObservation]
) -> tuple[int | None, Decision]:
    """Replay probes in order; the index of the probe at which the policy stops (or None)."""
    for i in range(len(probes)):
        if i > 0 and not probe_due(policy, probes[i].position):
            continue  # an unused probe changes nothing: the decision is the previous one
        decision = decide_cot(policy, probes[: i + 1])
        if decision.stop:
            return i, decision
    return None, Decision(False, reason="never stopped")


# --- self-consistency policies ---------------------------------------------------------------


class ScPolicy(BaseModel):
    """Entropy-certaindex early stopping for self-consistency programs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(
        1.0, ge=0.0, le=1.0, description="stop adding samples once certaindex >= threshold"
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
    certaindex = entropy_certaindex(group_sizes(groups))
    if certaindex >= policy.threshold:
        return Decision(True, answer=answer, reason=f"certaindex {certaindex:.2f}")
    return Decision(False, reason=f"certaindex {certaindex:.2f} below threshold")


# --- policy files ----------------------------------------------------------------------------

POLICY_FILE_VERSION = 1


class PolicyFileError(ValueError):
    """A policy file that is missing, not TOML, or not a valid policy; the message says why."""


class PolicyFile(BaseModel):
    """A versioned policy file: one policy, for one model or for all (`model = "*"`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = Field(1, description="policy file format version")
    kind: Literal["cot", "sc"] = Field(description="cot: chain-of-thought, sc: self-consistency")
    model: str = Field("*", min_length=1, description='the model it applies to, "*" for all')
    cot: CotPolicy | None = Field(None, description="the chain-of-thought policy (kind = cot)")
    sc: ScPolicy | None = Field(None, description="the self-consistency policy (kind = sc)")
    provenance: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="how the policy was made (informational only)"
    )

    @model_validator(mode="after")
    def _one_policy(self) -> PolicyFile:
        if self.kind == "cot" and (self.cot is None or self.sc is not None):
            raise ValueError('kind = "cot" needs a [cot] table and no [sc] table')
        if self.kind == "sc" and (self.sc is None or self.cot is not None):
            raise ValueError('kind = "sc" needs an [sc] table and no [cot] table')
        return self

    def applies_to(self, model: str | None) -> bool:
        return self.model == "*" or self.model == model


def parse_policy_file(text: str, source: str = "policy") -> PolicyFile:
    """A policy file's contents, validated; PolicyFileError says what is wrong and where."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{source}: not valid TOML ({exc})") from exc
    version = data.get("version")
    if version != POLICY_FILE_VERSION:
        raise PolicyFileError(
            f"{source}: policy file version {version!r} is not supported "
            f"(this dynasor reads version {POLICY_FILE_VERSION})"
        )
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise PolicyFileError(f"{source}: {where}: {first['msg']}") from exc


def load_policy_file(path: str | Path) -> PolicyFile:
    """Read and validate a policy file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PolicyFileError(f"{path}: no such policy file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"{path}: cannot read ({exc})") from exc
    return parse_policy_file(text, str(path))


def select_policy(files: Sequence[PolicyFile], model: str | None) -> PolicyFile | None:
    """The policy for `model`: one scoped to it by name wins over one for all models."""
    named = [f for f in files if f.model == model]
    if named:
        return named[-1]
    wildcard = [f for f in files if f.model == "*"]
    return wildcard[-1] if wildcard else None
