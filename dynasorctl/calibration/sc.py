"""Self-consistency: replay stopping policies (entropy certaindex, the Beta rule) over programs.

Samples are drawn in their recorded order. At each step the policy reads every
sample's answer at its check point (a probe at `check_tokens`, or the final answer)
and `decide_sc` says whether to stop adding samples; the samples used run to the
end and their majority final answer is the program's answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dynasorctl.calibration.damage import damage, problem_ranks
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.metrics import Answers
from dynasorctl.calibration.observed import ObservedProgram
from dynasorctl.calibration.search import (
    Calibration,
    Candidate,
    Evaluated,
    Target,
    certify,
    finish,
    split_by_group,
)
from dynasorctl.calibration.table import PROBE_PROMPT_COST
from proxy.core.certaindex import majority
from proxy.core.policy import ScPolicy, decide_sc, sc_answer_at_check
from proxy.pipeline.equivalence import group_answers

# Self-consistency recordings do not say how many tokens a probe decoded; this is the
# mean over the chain-of-thought recordings (6.6), rounded up.
UNRECORDED_PROBE_TOKENS = 7
DEFAULT_NAME = "default: ci>=1.0 min2 final"


@dataclass(frozen=True, slots=True)
class ScOutcome:
    """What a policy did to one program."""

    samples: int  # samples used, in recorded order
    answer: str | None  # their majority final answer
    probes: int
    probe_tokens: int  # decoded tokens of those probes
    tokens: int  # main tokens of the samples used


def replay_program(program: ObservedProgram, policy: ScPolicy | None,
                   grader: Grader) -> ScOutcome:
    """Apply one policy to one program exactly as the proxy would (None: use every sample)."""
    samples = program.samples
    n = len(samples)
    finals = [s.final_answer for s in samples]
    used = n
    probes = probe_tokens = 0
    if policy is not None:
        checked: list[str | None] = []
        used = n
        for i, s in enumerate(samples[: policy.max_samples]):
            answer, probed = sc_answer_at_check(policy, s.probes, s.final_answer, s.main_tokens)
            checked.append(answer)
            if probed:
                probes += 1
                before = [p for p in s.probes if p.position <= (policy.check_tokens or 0)]
                probe_tokens += (before[-1].tokens if before and before[-1].tokens
                                 else UNRECORDED_PROBE_TOKENS)
            groups = group_answers(checked, grader.same)
            if decide_sc(policy, checked, groups).stop:
                used = i + 1
                break
        else:
            used = min(n, policy.max_samples)
    chosen = finals[:used]
    answer = majority(chosen, group_answers(chosen, grader.same))
    return ScOutcome(used, answer, probes, probe_tokens,
                     sum(s.main_tokens for s in samples[:used]))


@dataclass(frozen=True, slots=True)
class ScFigures(Answers):
    """A policy on self-consistency programs: a run is a program, its answer the majority vote
    (damage per problem: a program's group)."""

    stopped: float  # share of programs that used fewer samples than recorded
    samples_used: float  # share of samples used
    net_saved: float  # (sample tokens not generated - probe cost) / all sample tokens


def sc_figures(programs: Sequence[ObservedProgram], policy: ScPolicy | None, grader: Grader,
               alpha: float = 0.05, bounds: bool = True) -> ScFigures:
    """A policy's figures over these programs, against using every recorded sample."""
    total = used_tokens = cost = samples = used_samples = stopped = 0
    right_full = right_policy = 0
    flags = np.zeros((4, len(programs)), bool)  # changed, labelled, lost, gained
    for i, program in enumerate(programs):
        full = replay_program(program, None, grader)
        out = replay_program(program, policy, grader)
        total += full.tokens
        used_tokens += out.tokens
        cost += out.probe_tokens + out.probes * PROBE_PROMPT_COST
        samples += full.samples
        used_samples += out.samples
        stopped += out.samples < full.samples
        flags[0, i] = out.samples < full.samples and not grader.same(full.answer, out.answer)
        if program.gold is not None:
            a, b = grader.same(program.gold, full.answer), grader.same(program.gold, out.answer)
            right_full += a
            right_policy += b
            flags[1:, i] = True, a and not b, b and not a
    changed, labelled, lost, gained = (int(f.sum()) for f in flags)
    n = len(programs)
    return ScFigures(
        runs=n, stopped=stopped / n if n else 0.0,
        samples_used=used_samples / samples if samples else 0.0,
        net_saved=(total - used_tokens - cost) / total if total else 0.0,
        changed=changed, labelled=labelled, lost=lost, gained=gained,
        accuracy_full=right_full / labelled if labelled else None,
        accuracy_policy=right_policy / labelled if labelled else None,
        damage=damage(problem_ranks([p.group for p in programs]), *flags, alpha=alpha,
                      bounds=bounds),
    )


# The rules searched and their thresholds: entropy certaindex (the paper), and the Beta
# rule's probability that the leading answer leads (Adaptive-Consistency uses 0.95).
SC_THRESHOLDS = {"entropy": (0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                 "beta": (0.75, 0.8, 0.85, 0.9, 0.95, 0.99)}
SC_LABEL = {"entropy": "ci", "beta": "lead"}


def sc_candidates(max_samples: int) -> list[tuple[str, ScPolicy | None]]:
    """The baselines (every sample; the default policy) and a grid of policies of each rule."""
    default = ScPolicy(max_samples=max_samples)
    out: list[tuple[str, ScPolicy | None]] = [("all samples", None),
                                              (DEFAULT_NAME, default)]
    for rule, thresholds in SC_THRESHOLDS.items():
        for check in (None, 512, 1024, 2048):
            for threshold in thresholds:
                for lo in (2, 3, 4, 5):
                    if lo >= max_samples:
                        continue
                    policy = ScPolicy(rule=rule, threshold=threshold,  # type: ignore[arg-type]
                                      check_tokens=check, min_samples=lo, max_samples=max_samples)
                    if policy == default:
                        continue
                    where = "final" if check is None else f"@{check}"
                    out.append((f"{SC_LABEL[rule]}>={threshold} min{lo} {where}", policy))
    return out


def calibrate_sc(programs: Sequence[ObservedProgram], grader: Grader, target: Target,
                 seed: int = 0, alpha: float = 0.05,
                 progress: Callable[[str, int, int], None] | None = None) -> Calibration:
    """Search certaindex policies on the tuning programs; certify on the held-out ones."""
    tune_mask = split_by_group([p.group for p in programs], seed)
    tune = [p for p, t in zip(programs, tune_mask) if t]
    holdout = [p for p, t in zip(programs, tune_mask) if not t]
    max_samples = max(len(p.samples) for p in programs)
    cands = sc_candidates(max_samples)
    evaluated = []
    for i, (name, policy) in enumerate(cands):
        # With bounds: the tuning bounds order the testing (`Target.order`); programs are few.
        evaluated.append(Evaluated(Candidate(name, policy),
                                   sc_figures(tune, policy, grader, alpha)))
        if progress:
            progress("replaying candidates", i + 1, len(cands))
    previous = previous_sc(evaluated, target)
    certify(evaluated, lambda e: sc_figures(holdout, e.candidate.policy, grader, alpha),
            target, alpha, baselines=2, also=[] if previous is None else [previous])
    cal = finish(evaluated, len(tune), len(holdout), len({p.group for p in tune}),
                 len({p.group for p in holdout}), alpha)
    cal.previous = None if previous is None else evaluated[previous]
    return cal


def previous_sc(evaluated: list[Evaluated], target: Target) -> int | None:
    """The entropy-rule candidate (the previous family) the tuning split rates best in target."""
    fits = [i for i, e in enumerate(evaluated[2:], 2) if e.candidate.policy.rule == "entropy"
            and target.order(e.tune) <= 1.0 and e.tune.net_saved > 0]
    return max(fits, key=lambda i: evaluated[i].tune.net_saved) if fits else None
