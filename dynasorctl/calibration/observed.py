"""Observed runs: the one shape calibration reads, whatever the source.

Trace files and the observation store both produce it here, so every later stage
is blind to where data came from. From the store (`store_source.py` runs the
queries; the mapping is `run_from_request` and `program_from_samples`):

- a run is a chain-of-thought request that was probed, ended with status 200 and a
  finish reason, generated tokens and belongs to no program: its `id`, `prompt_hash`
  as the `group` (the problem: all requests with one prompt stay on one side of the
  tune/holdout split), `model`, `final_answer`, `completion_tokens` as `main_tokens`,
  `completion_text` as `text` (stored only with --store-text; unless every run has
  it, no run keeps it, see `without_text`), and its probes with status "ok" ordered
  by position (position, answer, hesitant, output_tokens); "error" and "cancelled"
  probes gave no answer and are left out;
- a program is the `program_samples` rows of one `program_id` ordered by
  `sample_index`, each sample a run (answer, completion_tokens, the ok probes of
  its request and choice) grouped by the prompt hash of the program's first request;
- `gold` is the newest label naming the request id, else the newest naming its
  prompt hash; `final_correct` is unknown (None), so the final answer is graded.

Trace files may come with trial files (`dynasorctl/trials.py`), joined by trace id.
Probes and trials recorded at or past the end of their run (a fault of some sources)
are dropped and counted (`dropped`): a policy can never stop there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dynasorctl.errors import UserError
from dynasorctl.traces import CotTrace, ScProgram, TraceFileError, load
from dynasorctl.trials import Trials, TrialSetup, load_trials
from proxy.core.policy import ProbeObservation, ProbeSettings


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
    trials: tuple[ProbeObservation, ...] | None = None  # None: no trials recorded
    dropped: int = 0  # recorded probes and trials at or past the end of the run, left out


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


def within(probes: Sequence[ProbeObservation], main_tokens: int) -> tuple[ProbeObservation, ...]:
    """The probes taken before the run ended, by position (the others were never there)."""
    return tuple(sorted((p for p in probes if p.position < main_tokens), key=lambda p: p.position))


def run_from_trace(t: CotTrace, trials: Sequence[ProbeObservation] | None = None) -> ObservedRun:
    probes = within(t.probes, t.completion_tokens)
    kept = None if trials is None else within(trials, t.completion_tokens)
    dropped = len(t.probes) - len(probes) + (0 if trials is None else len(trials) - len(kept or ()))
    return ObservedRun(
        run_id=t.trace_id,
        group=problem_key(t.dataset, t.problem_id),
        model=t.model,
        probes=probes,
        final_answer=t.final_answer,
        main_tokens=t.completion_tokens,
        gold=t.gold,
        final_correct=t.final_correct,
        text=t.text,
        trials=kept,
        dropped=dropped,
    )


def program_from_trace(p: ScProgram) -> ObservedProgram:
    samples = tuple(
        ObservedRun(
            run_id=f"{p.program_id}#{i}",
            group=problem_key(p.dataset, p.problem_id),
            model=p.model,
            probes=within(s.probes, s.completion_tokens),
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


def gold_for(request_id: str, prompt_hash: str | None, by_request: Mapping[str, str],
             by_prompt: Mapping[str, str]) -> str | None:
    """A request's gold answer: its own label wins over its prompt's."""
    if request_id in by_request:
        return by_request[request_id]
    return by_prompt.get(prompt_hash) if prompt_hash is not None else None


def run_from_request(request_id: str, prompt_hash: str | None, model: str | None,
                     final_answer: str | None, completion_tokens: int,
                     completion_text: str | None, probes: Sequence[ProbeObservation],
                     gold: str | None) -> ObservedRun:
    """One stored chain-of-thought request as an observed run (probes: its ok ones)."""
    return ObservedRun(
        run_id=request_id,
        group=prompt_hash or request_id,  # an unhashed prompt is a problem of its own
        model=model or "",
        probes=within(probes, completion_tokens),
        final_answer=final_answer,
        main_tokens=completion_tokens,
        dropped=len(probes) - len(within(probes, completion_tokens)),
        gold=gold,
        text=completion_text,
    )


def program_from_samples(program_id: str, prompt_hash: str | None, model: str | None,
                         samples: Sequence[tuple[int, str | None, int,
                                                 Sequence[ProbeObservation]]],
                         gold: str | None) -> ObservedProgram:
    """One stored program; `samples` are (sample_index, answer, completion_tokens, probes)."""
    group = prompt_hash or program_id
    runs = tuple(
        ObservedRun(
            run_id=f"{program_id}#{index}",
            group=group,
            model=model or "",
            probes=within(probes, tokens),
            final_answer=answer,
            main_tokens=tokens,
            gold=gold,
        )
        for index, answer, tokens, probes in sorted(samples, key=lambda s: s[0])
    )
    return ObservedProgram(program_id, group, model or "", runs, gold)


def without_text(runs: Sequence[ObservedRun]) -> list[ObservedRun]:
    """The runs with no text signals at all.

    Text signals read as zero where the text is unknown, but the proxy, which has the
    text it relays, computes them for real. A learned rule fit on a mixture of real
    and zero signals would meet other inputs live. With every run's text dropped the
    signals are zero throughout, their columns are constant, the fit gives them weight
    exactly 0, and the rule decides on probe features alone, live as in replay.
    """
    return [replace(r, text=None) for r in runs]


@dataclass(frozen=True, slots=True)
class TraceData:
    """What trace files (and their trial files) hold, and how it was recorded."""

    data: list[ObservedRun] | list[ObservedProgram]
    probe: ProbeSettings | None = None  # how the periodic probes were taken, where recorded
    trials: TrialSetup | None = None  # how the trials were taken; None: no trial files
    notes: tuple[str, ...] = ()  # said once to the operator (probes dropped, ...)


def _probe_settings(records: Sequence[CotTrace]) -> ProbeSettings | None:
    """The traces' recorded probe settings, when every trace recorded the same ones."""
    seen = {(r.probe or {}).get("suffix") for r in records}
    tokens = {(r.probe or {}).get("max_tokens") for r in records}
    if len(seen) != 1 or len(tokens) != 1 or None in seen:
        return None
    return ProbeSettings(suffix=seen.pop(), max_tokens=tokens.pop())


def dropped_note(runs: Sequence[ObservedRun], what: str = "traces") -> str | None:
    """The one line that says probes past the end of their run were left out, if any were."""
    dropped = [r for r in runs if r.dropped]
    if not dropped:
        return None
    return (f"{sum(r.dropped for r in dropped)} recorded probes or trials at or past the end "
            f"of their run (completion_tokens) were left out, in {len(dropped)} {what}; no "
            "policy stops there")


def load_trace_files(paths: Sequence[str | Path],
                     trial_paths: Sequence[str | Path] = ()) -> TraceData:
    """Observed runs (or programs) of trace files, with the trials of trial files attached."""
    if not paths:
        raise UserError("no trace files given (use --traces FILE)")
    try:
        trials = load_trials(trial_paths) if trial_paths else None
    except TraceFileError as exc:
        raise UserError(str(exc)) from exc
    cot: list[CotTrace] = []
    programs: list[ObservedProgram] = []
    for path in paths:
        try:
            records = load(path)
        except TraceFileError as exc:
            raise UserError(str(exc)) from exc
        if isinstance(records[0], CotTrace):
            cot.extend(records)  # type: ignore[arg-type]
        else:
            programs.extend(program_from_trace(r) for r in records)  # type: ignore[arg-type]
    if cot and programs:
        raise UserError("the trace files mix chain-of-thought traces and self-consistency "
                        "programs; calibrate them separately")
    if programs and trials is not None:
        raise UserError("trial files go with chain-of-thought traces, not self-consistency "
                        "programs")
    runs = [run_from_trace(t, _trials_of(t, trials, trial_paths)) for t in cot]
    seen: set[str] = set()
    for item in runs or programs:
        key = item.run_id if isinstance(item, ObservedRun) else item.program_id
        if key in seen:
            raise UserError(f"{key}: appears twice in the trace files")
        seen.add(key)
    note = dropped_note(runs) if runs else dropped_note(
        [s for p in programs for s in p.samples], "samples")
    return TraceData(runs or programs, _probe_settings(cot) if cot else None,  # type: ignore[arg-type]
                     trials.setup if trials is not None else None,
                     (note,) if note else ())


def _trials_of(trace: CotTrace, trials: Trials | None,
               paths: Sequence[str | Path]) -> tuple[ProbeObservation, ...] | None:
    if trials is None:
        return None
    found = trials.by_trace.get(trace.trace_id)
    if found is None:
        raise UserError(f"trace {trace.trace_id} has no trials in "
                        f"{', '.join(str(p) for p in paths)}: give the trial file recorded "
                        "for these traces")
    return found


def load_observations(
    paths: Sequence[str | Path],
) -> list[ObservedRun] | list[ObservedProgram]:
    """Observed runs (chain-of-thought) or programs (self-consistency) from trace files."""
    return load_trace_files(paths).data
