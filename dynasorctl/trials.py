"""Trial files: DEER trials recorded along chain-of-thought traces, joined by `trace_id`.

One JSON object a line (gzip or plain): `trace_id`, how the trials were taken (`inducer`,
`trigger`, `max_trials`, and `temperature`, `top_p`, `max_tokens` where recorded) and
`trials`, each `[token_position, answer, confidence, out_tokens, char_position]`: at
the first `max_trials` whole-word `trigger` words (any case) of the trace's text, the
text before the word continued with the inducer and decoded greedily with logprobs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dynasorctl.traces import TraceFileError, open_trace_file
from proxy.core.policy import ProbeObservation, ProbeSettings, TransitionTrigger


@dataclass(frozen=True, slots=True)
class TrialSetup:
    """How every trial of a file was taken."""

    inducer: str
    trigger: str
    max_trials: int
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def settings(self) -> ProbeSettings:
        """The probe settings a policy needs to take trials as these were taken."""
        return ProbeSettings(suffix=self.inducer, temperature=self.temperature,
                             top_p=self.top_p, max_tokens=self.max_tokens, logprobs=True)

    def mismatch(self, rule: TransitionTrigger) -> str | None:
        """Why trials recorded this way cannot stand for the ones `rule` takes; None if they can."""
        if {w.lower() for w in rule.words} != {self.trigger.lower()}:
            return (f"the policy takes trials at {', '.join(rule.words)} but they were recorded "
                    f"at {self.trigger!r}")
        if rule.max_trials > self.max_trials:
            return (f"the policy takes up to {rule.max_trials} trials but at most "
                    f"{self.max_trials} were recorded per trace")
        recorded = self.settings()
        for name in ("suffix", "temperature", "top_p", "max_tokens"):
            want, got = getattr(rule.probe, name), getattr(recorded, name)
            if want is not None and got is not None and want != got:
                return f"the policy's trials use {name} {want!r} but they were recorded with {got!r}"
        return None


@dataclass(frozen=True, slots=True)
class Trials:
    """Every trial of one or more trial files, by trace id."""

    setup: TrialSetup
    by_trace: dict[str, tuple[ProbeObservation, ...]]
    # The character offset in the trace's text of each trial's word, in `by_trace`'s order
    # (None where not recorded): how `dynasorctl replay` finds the trial a probe asks for.
    chars: dict[str, tuple[int | None, ...]] = field(default_factory=dict)


def _trial(raw: object) -> ProbeObservation:
    if not isinstance(raw, list) or len(raw) < 4:
        raise ValueError("a trial is [token_position, answer, confidence, out_tokens, ...]")
    position, answer, confidence, tokens = raw[0], raw[1], raw[2], raw[3]
    if not isinstance(position, int) or position < 0 or not isinstance(tokens, int):
        raise ValueError(f"bad token position or token count in {raw!r}")
    if not isinstance(confidence, (int, float)) or not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence {confidence!r} is not a probability")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"answer {answer!r} is not a string")
    return ProbeObservation(position, answer or None, False, tokens,
                            confidence=float(confidence), trial=True)


def _char(raw: list) -> int | None:
    return raw[4] if len(raw) > 4 and isinstance(raw[4], int) and raw[4] >= 0 else None


def _setup(raw: dict) -> TrialSetup:
    try:
        return TrialSetup(inducer=str(raw["inducer"]), trigger=str(raw["trigger"]),
                          max_trials=int(raw["max_trials"]), temperature=raw.get("temperature"),
                          top_p=raw.get("top_p"), max_tokens=raw.get("max_tokens"))
    except KeyError as exc:
        raise ValueError(f"missing field {exc}") from exc


def load_trials(paths: Sequence[str | Path]) -> Trials:
    """All records of these trial files; TraceFileError says which file and line is wrong."""
    setup: TrialSetup | None = None
    by_trace: dict[str, tuple[ProbeObservation, ...]] = {}
    chars: dict[str, tuple[int | None, ...]] = {}
    for path in map(Path, paths):
        count = 0
        try:
            with open_trace_file(path) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        raw = json.loads(line)
                        if not isinstance(raw, dict) or not isinstance(raw.get("trials"), list):
                            raise TypeError("a trial record is an object with a trials list")
                        trace_id = str(raw["trace_id"])
                        this = _setup(raw)
                        pairs = sorted(((_trial(t), _char(t)) for t in raw["trials"]),
                                       key=lambda p: p[0].position)
                        trials = tuple(t for t, _ in pairs)
                    except (ValueError, KeyError, TypeError) as exc:
                        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                        raise TraceFileError(f"{where}: not a trial record ({detail})") from exc
                    if setup is not None and this != setup:
                        raise TraceFileError(f"{where}: trials taken differently from the ones "
                                             f"before ({this} against {setup})")
                    if trace_id in by_trace:
                        raise TraceFileError(f"{where}: trace {trace_id} has trials twice")
                    setup = this
                    by_trace[trace_id] = trials
                    chars[trace_id] = tuple(c for _, c in pairs)
                    count += 1
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise TraceFileError(f"{path}: cannot read ({exc})") from exc
        if count == 0:
            raise TraceFileError(f"{path}: holds no trial records")
    if setup is None:
        raise TraceFileError("no trial files given")
    return Trials(setup, by_trace, chars)
