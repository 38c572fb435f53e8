"""The observation store as calibration's source, and the home of calibrated policies.

Reads what `proxy.pipeline.record` wrote into the runs and programs of `observed.py` (the
mapping is described there), and keeps recommended policies as versioned rows. A run's
trials (probe rows of kind `trial`, with their confidence) become its trials, as a trial
file's would: the store replays like a trace file with trials. The store does not keep
how trials were taken; they are taken as the proxy takes them unless a policy says
otherwise (`STORE_TRIALS`: DEER's settings at the default `trial_words` and `trial_max`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import Engine, and_, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from dynasorctl.calibration.observed import (
    ObservedProgram,
    ObservedRun,
    gold_for,
    program_from_samples,
    run_from_request,
    within,
    without_text,
)
from dynasorctl.errors import UserError
from dynasorctl.trials import TrialSetup
from proxy.core.policy import TRIAL_SETTINGS, ProbeObservation
from proxy.settings import Settings
from proxy.store.models import LabelRow, PolicyRow, ProbeRow, RequestRow, SampleRow

_DEFAULTS = Settings.model_fields
STORE_TRIALS = TrialSetup(
    inducer=TRIAL_SETTINGS.suffix or "", trigger=_DEFAULTS["trial_words"].default[0],
    max_trials=_DEFAULTS["trial_max"].default, temperature=TRIAL_SETTINGS.temperature,
    top_p=TRIAL_SETTINGS.top_p, max_tokens=TRIAL_SETTINGS.max_tokens)


@dataclass(frozen=True, slots=True)
class StoreRuns:
    """The chain-of-thought runs the store holds, and what they lack."""

    runs: list[ObservedRun]
    with_text: int  # requests stored with their completion text (--store-text)
    labelled: int
    trials: TrialSetup | None = None  # how the runs' trials were taken; None: the store has none

    @property
    def text_dropped(self) -> bool:
        """Whether text signals were left out (some or all requests have no stored text)."""
        return bool(self.runs) and self.with_text < len(self.runs)


def _cot_requests(model: str | None) -> list:
    """Which requests are calibration runs: probed chain-of-thought that finished."""
    where = [
        RequestRow.probed.is_(True),
        RequestRow.status_code == 200,
        RequestRow.finish_reason.is_not(None),
        RequestRow.program_id.is_(None),  # program members are self-consistency samples
        RequestRow.completion_tokens > 0,  # savings are shares of these tokens
    ]
    if model is not None:
        where.append(RequestRow.model == model)
    return where


def _labels(session: Session) -> tuple[dict[str, str], dict[str, str]]:
    """The newest gold answer per request id and per prompt hash."""
    by_request: dict[str, str] = {}
    by_prompt: dict[str, str] = {}
    rows = session.execute(select(LabelRow.request_id, LabelRow.prompt_hash, LabelRow.gold)
                           .order_by(LabelRow.created_at, LabelRow.id))
    for request_id, prompt_hash, gold in rows:
        if request_id is not None:
            by_request[request_id] = gold
        elif prompt_hash is not None:
            by_prompt[prompt_hash] = gold
    return by_request, by_prompt


@dataclass(slots=True)
class Probed:
    """One request choice's ok probes and trials, in order."""

    probes: list[ProbeObservation]
    trials: list[ProbeObservation]


def _ok_probes(session: Session, where: list) -> dict[tuple[str, int], Probed]:
    """The ok probes (and trials) of the requests selected by `where`, per (request, choice)."""
    rows = session.execute(
        select(ProbeRow.request_id, ProbeRow.choice_index, ProbeRow.position, ProbeRow.answer,
               ProbeRow.hesitant, ProbeRow.output_tokens, ProbeRow.confidence, ProbeRow.kind)
        .join(RequestRow, ProbeRow.request_id == RequestRow.id)
        .where(ProbeRow.status == "ok", *where)
        .order_by(ProbeRow.request_id, ProbeRow.choice_index, ProbeRow.position, ProbeRow.id)
    )
    out: dict[tuple[str, int], Probed] = defaultdict(lambda: Probed([], []))
    for request_id, choice, position, answer, hesitant, tokens, confidence, kind in rows:
        trial = kind == "trial"
        found = out[(request_id, choice)]
        (found.trials if trial else found.probes).append(ProbeObservation(
            position, answer or None, bool(hesitant), tokens or 0, confidence=confidence,
            trial=trial))
    return out


def with_trials(run: ObservedRun, trials: list[ProbeObservation] | None) -> ObservedRun:
    """The run with its recorded trials (those taken before it ended), as a trial file gives them."""
    if trials is None:
        return run
    kept = within(trials, run.main_tokens)
    return replace(run, trials=kept, dropped=run.dropped + len(trials) - len(kept))


def _read_error(engine: Engine, exc: SQLAlchemyError) -> UserError:
    return UserError(f"cannot read the store {engine.url.render_as_string()}: "
                     f"{str(getattr(exc, 'orig', None) or exc).splitlines()[0]}")


def load_runs(engine: Engine, model: str | None = None) -> StoreRuns:
    """Every probed chain-of-thought request that finished with status 200, oldest first.

    Text signals need every run's completion text: if any run lacks it (the proxy ran
    without --store-text for a while, or always), no run keeps its text (see
    `observed.without_text`), so learned rules fit on probe features alone.
    """
    where = _cot_requests(model)
    try:
        with Session(engine) as session:
            by_request, by_prompt = _labels(session)
            probes = _ok_probes(session, where)
            rows = session.execute(
                select(RequestRow.id, RequestRow.prompt_hash, RequestRow.model,
                       RequestRow.final_answer, RequestRow.completion_tokens,
                       RequestRow.completion_text)
                .where(*where).order_by(RequestRow.created_at, RequestRow.id)
            ).all()
    except SQLAlchemyError as exc:
        raise _read_error(engine, exc) from exc
    # Trials were taken if any run has one; then a run without any had no transition word.
    took_trials = any(p.trials for p in probes.values())
    runs = []
    for rid, prompt_hash, model_name, final, tokens, text in rows:
        found = probes.get((rid, 0)) or Probed([], [])
        run = run_from_request(rid, prompt_hash, model_name, final, tokens, text, found.probes,
                               gold_for(rid, prompt_hash, by_request, by_prompt))
        runs.append(with_trials(run, found.trials if took_trials else None))
    with_text = sum(1 for r in runs if r.text is not None)
    labelled = sum(1 for r in runs if r.gold is not None)
    if with_text < len(runs):
        runs = without_text(runs)
    return StoreRuns(runs, with_text, labelled, STORE_TRIALS if took_trials else None)


def load_programs(engine: Engine, model: str | None = None) -> list[ObservedProgram]:
    """Every self-consistency program, its samples (status 200 requests) in drawing order."""
    where = [RequestRow.program_id.is_not(None), RequestRow.status_code == 200]
    if model is not None:
        where.append(RequestRow.model == model)
    try:
        with Session(engine) as session:
            by_request, by_prompt = _labels(session)
            probes = _ok_probes(session, where)
            rows = session.execute(
                select(SampleRow.program_id, SampleRow.sample_index, SampleRow.answer,
                       SampleRow.completion_tokens, SampleRow.request_id,
                       SampleRow.choice_index, RequestRow.prompt_hash, RequestRow.model)
                .join(RequestRow, SampleRow.request_id == RequestRow.id)
                .where(*where)
                .order_by(SampleRow.program_id, SampleRow.sample_index, SampleRow.id)
            ).all()
    except SQLAlchemyError as exc:
        raise _read_error(engine, exc) from exc
    grouped: dict[str, list] = defaultdict(list)
    for row in rows:
        grouped[row.program_id].append(row)
    programs = []
    for program_id, samples in grouped.items():
        first = samples[0]
        programs.append(program_from_samples(
            program_id, first.prompt_hash, first.model,
            [(s.sample_index, s.answer, s.completion_tokens or 0,
              (probes.get((s.request_id, s.choice_index)) or Probed([], [])).probes)
             for s in samples],
            gold_for(first.request_id, first.prompt_hash, by_request, by_prompt)))
    return programs


def save_policy(engine: Engine, kind: str, model: str, policy_toml: str, source: str,
                note: str | None = None) -> int:
    """Keep a policy as the next inactive version for (kind, model); returns the version."""
    for _ in range(3):  # two calibrations finishing at once: the loser takes the next number
        try:
            with Session(engine) as session, session.begin():
                latest = session.scalar(select(func.max(PolicyRow.version))
                                        .where(and_(PolicyRow.kind == kind,
                                                    PolicyRow.model == model)))
                version = (latest or 0) + 1
                session.add(PolicyRow(kind=kind, model=model, version=version,
                                      policy_toml=policy_toml, source=source,
                                      created_at=datetime.now(UTC), active=False, note=note))
            return version
        except IntegrityError:
            continue
        except SQLAlchemyError as exc:
            raise UserError(f"cannot store the policy in {engine.url.render_as_string()}: "
                            f"{str(getattr(exc, 'orig', None) or exc).splitlines()[0]}") from exc
    raise UserError("cannot store the policy: its version number was taken three times by "
                    "concurrent calibrations; run again")

