"""Observed runs: the one shape calibration reads, whatever the source.

Trace files produce them here; the observation store is to produce the same shape
from its rows, so every later stage is blind to where data came from: a request's
`completion_text`, `completion_tokens`, `final_answer` and `model`, its probes with
status "ok" (position, answer, hesitant, output_tokens), a problem key for `group`
(the prompt hash) and, once labels are imported, `gold`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dynasorctl.errors import UserError
from dynasorctl.traces import CotTrace, ScProgram, TraceFileError, load
from proxy.policy import ProbeObservation


@dataclass(frozen=True, slots=True)
class ObservedRun:
    """One unstopped generation and the probes taken along it."""

    run_id: str
    group: str  # the problem: runs of one group are never split across tune and holdout
    model: str
    probes: tuple[ProbeObservation, ...]  # oldest first
    final_answer: str | None  # what the unstopped run answered
    main_tokens: int  # tokens the unstopped run generated
    gold: str | None = None  # the reference answer, where labelled
    final_correct: bool | None = None  # the source's grading of final_answer, if any
    text: str | None = None  # the generated text, for text signals (None: unknown)


@dataclass(frozen=True, slots=True)
class ObservedProgram:
    """One self-consistency program: its samples in the order they were drawn."""

    program_id: str
    group: str
    model: str
    samples: tuple[ObservedRun, ...]
    gold: str | None = None


def problem_key(dataset: str, problem_id: str) -> str:
    return f"{dataset}/{problem_id}"


def run_from_trace(t: CotTrace) -> ObservedRun:
    return ObservedRun(
        run_id=t.trace_id,
        group=problem_key(t.dataset, t.problem_id),
        model=t.model,
        probes=tuple(sorted(t.probes, key=lambda p: p.position)),
        final_answer=t.final_answer,
        main_tokens=t.completion_tokens,
        gold=t.gold,
        final_correct=t.final_correct,
        text=t.text,
    )


def program_from_trace(p: ScProgram) -> ObservedProgram:
    samples = tuple(
        ObservedRun(
            run_id=f"{p.program_id}#{i}",
            group=problem_key(p.dataset, p.problem_id),
            model=p.model,
            probes=tuple(sorted(s.probes, key=lambda q: q.position)),
            final_answer=s.final_answer,
            main_tokens=s.completion_tokens,
            gold=p.gold,
            final_correct=s.final_correct,
            text=s.text,
        )
        for i, s in enumerate(p.samples)
    )
    return ObservedProgram(p.program_id, problem_key(p.dataset, p.problem_id), p.model,
                           samples, p.gold)


def load_observations(
    paths: Sequence[str | Path],
) -> list[ObservedRun] | list[ObservedProgram]:
    """Observed runs (chain-of-thought) or programs (self-consistency) from trace files."""
    if not paths:
        raise UserError("no trace files given (use --traces FILE)")
    runs: list[ObservedRun] = []
    programs: list[ObservedProgram] = []
    for path in paths:
        try:
            records = load(path)
        except TraceFileError as exc:
            raise UserError(str(exc)) from exc
        if isinstance(records[0], CotTrace):
            runs.extend(run_from_trace(r) for r in records)  # type: ignore[arg-type]
        else:
            programs.extend(program_from_trace(r) for r in records)  # type: ignore[arg-type]
    if runs and programs:
        raise UserError("the trace files mix chain-of-thought traces and self-consistency "
                        "programs; calibrate them separately")
    seen: set[str] = set()
    for item in runs or programs:
        key = item.run_id if isinstance(item, ObservedRun) else item.program_id
        if key in seen:
            raise UserError(f"{key}: appears twice in the trace files")
        seen.add(key)
    return runs or programs
