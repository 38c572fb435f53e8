"""The candidate policies built on the newer signals: text, answer statements, trials.

What the data holds decides what is searched: the end-of-thinking stop and the
statement probes need the generated text; trials need trial files. Every candidate
takes its trials as they were recorded, and the policy written probes as the data was
recorded (`with_recorded_probes`), so the proxy runs it exactly as it was replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynasorctl.trials import TrialSetup
from proxy.core.policy import CotPolicy, ProbeSettings, StatementTrigger, TransitionTrigger

# DEER's threshold on one trial's confidence, and "k trials in a row give one answer, each
# at least this confident" (a second, corroborated way to stop below the threshold).
TRIAL_THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
TRIAL_AGREEMENT: tuple[tuple[int, float] | None, ...] = (
    None, (2, 0.9), (2, 0.95), (2, 0.98), (2, 0.99), (3, 0.8), (3, 0.9), (3, 0.95))
# Probe-agreement windows worth adding to the text signals (label, interval, window).
WINDOWS_WITH_TEXT = (("w8@256", 256, 8), ("w12@256", 256, 12), ("w16@256", 256, 16),
                     ("w24@512>128@4k", 128, 24), ("w16@128", 128, 16))


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the calibration data holds, and how its probes and trials were taken."""

    interval: int  # the probe interval of the recordings (gcd of probe positions)
    text: bool  # every run kept its generated text
    probe: ProbeSettings | None = None  # the periodic probes' settings, where recorded
    trials: TrialSetup | None = None  # None: no trials recorded


def _text_modes(recorded: Recorded) -> list[tuple[str, dict]]:
    """(label, fields) of the text-signal add-ons: none, the end of thinking, statements too."""
    if not recorded.text:
        return [("", {})]
    said = StatementTrigger(align=recorded.interval)
    return [("", {}), ("end", {"think_end": True}),
            ("said+end", {"think_end": True, "statement": said})]


def text_candidates(recorded: Recorded) -> list[tuple[str, CotPolicy]]:
    """Stops on the text alone, with statement probes, and with probe-agreement windows."""
    if not recorded.text:
        return []
    every = StatementTrigger(align=recorded.interval, new_answers_only=False)
    out = [("end", CotPolicy(periodic=False, think_end=True)),
           ("said", CotPolicy(periodic=False, statement=StatementTrigger(
               align=recorded.interval))),
           ("said+end", CotPolicy(periodic=False, think_end=True, statement=StatementTrigger(
               align=recorded.interval))),
           ("said-every+end", CotPolicy(periodic=False, think_end=True, statement=every))]
    for name, interval, window in WINDOWS_WITH_TEXT:
        if interval % recorded.interval:
            continue
        schedule = ({"interval": 128, "early_interval": 512, "dense_from": 4096}
                    if ">" in name else {"interval": interval})
        for label, fields in _text_modes(recorded)[1:]:
            out.append((f"{name}+{label}", CotPolicy(**schedule, window=window, **fields)))
    return out


def trial_candidates(recorded: Recorded) -> list[tuple[str, CotPolicy]]:
    """DEER's threshold (and agreeing trials), alone and with the text signals."""
    setup = recorded.trials
    if setup is None:
        return []
    out = []
    for threshold in TRIAL_THRESHOLDS:
        for agree in TRIAL_AGREEMENT:
            if agree is not None and agree[1] >= threshold:
                continue  # never weaker than the threshold alone
            rule = TransitionTrigger(
                words=(setup.trigger.lower(),), max_trials=setup.max_trials,
                min_confidence=threshold, agree=None if agree is None else agree[0],
                agree_confidence=None if agree is None else agree[1], probe=setup.settings())
            name = f"trial>={threshold}" + ("" if agree is None else f"|{agree[0]}x>={agree[1]}")
            for label, fields in _text_modes(recorded):
                out.append((name + (f"+{label}" if label else ""),
                            CotPolicy(periodic=False, transition=rule, **fields)))
    return out


def with_recorded_probes(policy: CotPolicy, recorded: Recorded | None) -> CotPolicy:
    """The policy set to take its probes as the data's probes were taken, where recorded."""
    if recorded is None or recorded.probe is None or policy.probe is not None:
        return policy
    if not (policy.periodic or policy.statement):
        return policy  # it takes no probe (trials carry their own settings)
    return policy.model_copy(update={"probe": recorded.probe})
