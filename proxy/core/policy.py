"""Stopping policies and the one decision function every stage shares; policy files.

The proxy (live), `dynasorctl calibrate` and `dynasorctl evaluate` (replay) all
call `decide_cot` / `decide_sc` on the same observations, so a replayed decision
is the live decision by construction. The parts live in their own modules
(`cot_policy`, `sc_policy`, `decide`, `observations`, `text`) and are all importable
from here. Policy files (TOML, `PolicyFile`) are read here too, so the proxy loads
them without the operator's tooling.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from proxy.core.cot_policy import (
    FEATURES,
    PAPER_DEFAULT,
    TRIAL_SETTINGS,
    CotPolicy,
    Feature,
    ProbeSettings,
    StatementTrigger,
    StopRule,
    TransitionTrigger,
)
from proxy.core.decide import (
    cot_features,
    decide_cot,
    first_stop,
    periodic_probes,
    probe_due,
    probes_used,
    statement_due,
    taken,
    trials_taken,
)
from proxy.core.observations import (
    Decision,
    Observation,
    ProbeObservation,
    Source,
    StatementObservation,
    StopInfo,
    ThinkEndObservation,
    causal_key,
    in_causal_order,
)
from proxy.core.sc_policy import ScPolicy, decide_sc, leader_probability, sc_answer_at_check
from proxy.core.text import (
    HESITATION_RE,
    HESITATION_WORDS,
    RECENT_CHARS,
    THINK_END,
    VERIFICATION_RE,
    VERIFICATION_WORDS,
    TextSignals,
    answer_pattern,
    text_signals,
)

__all__ = [
    "FEATURES", "HESITATION_RE", "HESITATION_WORDS", "PAPER_DEFAULT", "POLICY_FILE_VERSION",
    "RECENT_CHARS", "THINK_END", "TRIAL_SETTINGS", "VERIFICATION_RE", "VERIFICATION_WORDS",
    "CotPolicy", "Decision", "Feature", "Observation", "PolicyFile", "PolicyFileError",
    "ProbeObservation", "ProbeSettings", "ScPolicy", "Source", "StatementObservation",
    "StatementTrigger", "StopInfo", "StopRule", "TextSignals", "ThinkEndObservation",
    "TransitionTrigger", "answer_pattern", "causal_key", "cot_features", "decide_cot",
    "decide_sc", "first_stop", "in_causal_order", "leader_probability", "load_policy_file",
    "parse_policy_file", "periodic_probes", "probe_due", "probes_used", "sc_answer_at_check",
    "select_policy", "statement_due", "taken", "text_signals", "trials_taken",
]


# --- policy files ----------------------------------------------------------------------------

# Version 2 added the triggers (periodic = false, statement, transition, think_end), probe
# settings, confidence gates and the Beta self-consistency rule; version 1 files still load.
POLICY_FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)


class PolicyFileError(ValueError):
    """A policy file that is missing, not TOML, or not a valid policy; the message says why."""


class PolicyFile(BaseModel):
    """A versioned policy file: one policy, for one model or for all (`model = "*"`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1, 2] = Field(POLICY_FILE_VERSION, description="policy file format version")
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
        section = self.cot if self.kind == "cot" else self.sc
        if self.version == 1 and section is not None and section.version_2:
            raise ValueError("the policy uses fields of policy file version 2: set version = 2")
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
    if version not in READABLE_VERSIONS:
        raise PolicyFileError(
            f"{source}: policy file version {version!r} is not supported "
            f"(this dynasor reads versions {', '.join(map(str, READABLE_VERSIONS))})"
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
