"""What a policy saves and what it changes: observed on the requests it decided, projected
by replaying it over the store's recent probed requests.

Observed. A shadowed request carries where the policy would have stopped and what it
would have answered (`decision_token`, `decision_answer`, migration 0003) beside what
the unstopped run did, so its savings and answer changes are measured exactly. An
enforced request was stopped, so its unstopped length and answer are never seen: its
savings are estimated against the shadowed requests of the same policy (a rollout
splits them at random per program), and its answers changed cannot be observed.

Projected. The policy replayed by calibration's own `evaluate_cot` over the newest
probed requests (at most `MAX_RUNS`). Bounds on the share of answers changed are
calibration's: 95%, per problem (a prompt), since the requests of one prompt fail
together. Text signals are left out (as `calibrate` does whenever some
request was stored without its text): loading every completion would not be bounded.

Every read is bounded by LIMIT over an index; the grading and the replay are plain
functions, run by the dashboard in a worker thread.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine, Row, or_, select

from dynasorctl.calibration.damage import damage, problem_ranks
from dynasorctl.calibration.evaluate import evaluate_cot
from dynasorctl.calibration.grading import Grader
from dynasorctl.calibration.observed import ObservedRun, gold_for, run_from_request
from dynasorctl.calibration.store_source import STORE_TRIALS, with_trials
from dynasorctl.calibration.table import PROBE_PROMPT_COST
from dynasorctl.errors import UserError
from proxy.core.policy import PolicyFileError, ProbeObservation, parse_policy_file
from proxy.store.models import LabelRow, PolicyRow, ProbeRow, RequestRow

MAX_DECIDED = 5000  # observed: the newest requests one policy decided
MAX_RUNS = 5000  # projected: the newest probed requests replayed
ALPHA = 0.05


@dataclass(frozen=True)
class StoredPolicy:
    id: int
    version: int
    model: str  # the model it was calibrated for, "*" for all
    toml: str

    @property
    def recorded_as(self) -> str:
        """How the proxy names it in `requests.policy` when the rollout supplies it."""
        return f"policy {self.id}"


@dataclass(frozen=True)
class Damage:
    """Answers changed out of `n`, and the 95% upper bound on the share per new problem."""

    changed: int
    n: int
    upper: float

    @property
    def share(self) -> float:
        return self.changed / self.n if self.n else 0.0


def changed_damage(problems: Sequence[str], changed: Sequence[bool]) -> Damage:
    """Answers changed over records of these problems, bounded as calibration bounds them."""
    flags = np.asarray(changed, bool)
    none = np.zeros_like(flags)
    d = damage(problem_ranks(problems), flags, none, none, none, ALPHA)
    assert d.changed_upper is not None
    return Damage(int(flags.sum()), len(flags), d.changed_upper)


@dataclass(frozen=True)
class Group:
    """Requests one policy decided in one way (shadowed, or enforced)."""

    requests: int
    stopped: int  # requests the policy stopped (or would have)
    net_saved: float | None  # share of main tokens; None: no baseline to compare with
    damage: Damage | None  # None: not observable (an enforced stop hides the answer)


@dataclass(frozen=True)
class Projection:
    runs: int  # replayed runs in the policy's scope
    stopped: float  # share of them stopped
    net_saved: float
    damage: Damage


@dataclass(frozen=True)
class PolicySavings:
    policy: StoredPolicy
    shadow: Group | None  # None: the policy decided no shadowed request
    enforced: Group | None
    projected: Projection | None
    problem: str | None = None  # why there is no projection


@dataclass(frozen=True)
class Savings:
    active: PolicySavings | None  # the policy the rollout uses (None: none is rolled out)
    recommended: PolicySavings | None  # the newest stored chain-of-thought policy


@dataclass(frozen=True)
class Decided:
    """One request a policy decided, as the proxy recorded it."""

    mode: str  # shadow | enforce
    enforced: bool  # the proxy stopped it
    problem: str  # its prompt (hash), or the request itself when that is unknown
    completion_tokens: int
    probe_tokens: int
    probe_count: int
    decision_token: int | None
    decision_answer: str | None
    final_answer: str | None

    @property
    def probe_cost(self) -> int:
        return self.probe_tokens + PROBE_PROMPT_COST * self.probe_count


# --- reads ------------------------------------------------------------------------------------


def _policy(row: Row[Any]) -> StoredPolicy:
    return StoredPolicy(row.id, row.version, row.model, row.policy_toml)


def read_policy(engine: Engine, policy_id: int) -> StoredPolicy | None:
    p = PolicyRow
    with engine.connect() as conn:
        row = conn.execute(select(p.id, p.version, p.model, p.policy_toml)
                           .where(p.id == policy_id)).one_or_none()
    return None if row is None else _policy(row)


def newest_policy(engine: Engine) -> StoredPolicy | None:
    """The newest stored chain-of-thought policy: what the last calibration recommended."""
    p = PolicyRow
    with engine.connect() as conn:
        row = conn.execute(select(p.id, p.version, p.model, p.policy_toml)
                           .where(p.kind == "cot").order_by(p.id.desc()).limit(1)).one_or_none()
    return None if row is None else _policy(row)


def read_decided(engine: Engine, recorded_as: str, limit: int = MAX_DECIDED) -> list[Decided]:
    """The newest finished requests `recorded_as` decided (ix_requests_policy_created_at)."""
    r = RequestRow
    query = (select(r.id, r.prompt_hash, r.mode, r.enforced, r.completion_tokens, r.probe_tokens,
                    r.probe_count, r.decision_token, r.decision_answer, r.final_answer)
             .where(r.policy == recorded_as, r.status_code == 200, r.completion_tokens > 0)
             .order_by(r.created_at.desc()).limit(limit))
    with engine.connect() as conn:
        return [Decided(row.mode, bool(row.enforced), row.prompt_hash or f"request {row.id}",
                        row.completion_tokens, row.probe_tokens or 0,
                        row.probe_count or 0, row.decision_token, row.decision_answer,
                        row.final_answer) for row in conn.execute(query)]


def recent_runs(engine: Engine, limit: int = MAX_RUNS) -> list[ObservedRun]:
    """The newest probed chain-of-thought requests that finished, as calibration's runs.

    The same requests `store_source.load_runs` takes (probed, status 200, finished, not
    in a program, tokens generated), but only the newest `limit`, and without text.
    """
    r, p, lab = RequestRow, ProbeRow, LabelRow
    newest = (select(r.id, r.prompt_hash, r.model, r.final_answer, r.completion_tokens,
                     r.created_at)
              .where(r.probed.is_(True), r.status_code == 200, r.finish_reason.is_not(None),
                     r.program_id.is_(None), r.completion_tokens > 0)
              .order_by(r.created_at.desc()).limit(limit).subquery())
    probes = (select(p.request_id, p.position, p.answer, p.hesitant, p.output_tokens,
                     p.confidence, p.kind)
              .join(newest, newest.c.id == p.request_id)
              .where(p.choice_index == 0, p.status == "ok")
              .order_by(p.request_id, p.position, p.id))
    labels = (select(lab.request_id, lab.prompt_hash, lab.gold)
              .where(or_(lab.request_id.in_(select(newest.c.id)),
                         lab.prompt_hash.in_(select(newest.c.prompt_hash))))
              .order_by(lab.created_at, lab.id))
    with engine.connect() as conn:
        rows = conn.execute(select(newest).order_by(newest.c.created_at, newest.c.id)).all()
        found: dict[str, list[ProbeObservation]] = defaultdict(list)
        trials: dict[str, list[ProbeObservation]] = defaultdict(list)
        for rid, position, answer, hesitant, tokens, confidence, kind in conn.execute(probes):
            (trials if kind == "trial" else found)[rid].append(ProbeObservation(
                position, answer or None, bool(hesitant), tokens or 0, confidence=confidence,
                trial=kind == "trial"))
        by_request: dict[str, str] = {}
        by_prompt: dict[str, str] = {}
        for request_id, prompt_hash, gold in conn.execute(labels):  # newest label wins
            if request_id is not None:
                by_request[request_id] = gold
            elif prompt_hash is not None:
                by_prompt[prompt_hash] = gold
    return [with_trials(run_from_request(row.id, row.prompt_hash, row.model, row.final_answer,
                                         row.completion_tokens, None, found.get(row.id, ()),
                                         gold_for(row.id, row.prompt_hash, by_request, by_prompt)),
                        trials.get(row.id, []) if trials else None)
            for row in rows]


# --- figures ----------------------------------------------------------------------------------


def observed(rows: Sequence[Decided], grader: Grader) -> tuple[Group | None, Group | None]:
    """(shadowed, enforced) figures of the requests one policy decided.

    Shadowed: net saved = (tokens after the would-be stop - every probe's cost) / tokens
    generated, counting the probes past the stop too (conservative); answers changed =
    would-be answers that differ from the final ones. Enforced: 1 - (tokens generated
    + probe cost per request) / (tokens per shadowed request).
    """
    shadow = [d for d in rows if d.mode == "shadow"]
    enforced = [d for d in rows if d.mode == "enforce"]
    shadow_group = enforced_group = None
    if shadow:
        stops = [d for d in shadow if d.decision_token is not None]
        main = sum(d.completion_tokens for d in shadow)
        saved = sum(max(0, d.completion_tokens - (d.decision_token or 0)) for d in stops)
        cost = sum(d.probe_cost for d in shadow)
        verdicts = iter(grader.same_many([(d.final_answer, d.decision_answer) for d in stops]))
        changed = [d.decision_token is not None and not next(verdicts) for d in shadow]
        shadow_group = Group(len(shadow), len(stops), (saved - cost) / main,
                             changed_damage([d.problem for d in shadow], changed))
    if enforced:
        per_request = sum(d.completion_tokens + d.probe_cost for d in enforced) / len(enforced)
        baseline = (sum(d.completion_tokens for d in shadow) / len(shadow)) if shadow else None
        enforced_group = Group(len(enforced), sum(d.enforced for d in enforced),
                               1 - per_request / baseline if baseline else None, None)
    return shadow_group, enforced_group


def project(runs: Sequence[ObservedRun], policy: StoredPolicy, grader: Grader) -> Projection:
    """The policy replayed by `evaluate_cot` over the runs of the model(s) it applies to.

    Raises ValueError with a one-line reason when it cannot be replayed.
    """
    try:
        pf = parse_policy_file(policy.toml, policy.recorded_as)
    except PolicyFileError as exc:
        raise ValueError(str(exc)) from exc
    if pf.kind != "cot" or pf.cot is None:
        raise ValueError(f"{policy.recorded_as} is not a chain-of-thought policy")
    scoped = [run for run in runs if pf.applies_to(run.model)]
    if not scoped:
        raise ValueError("no probed requests of its model to replay")
    try:
        took_trials = any(run.trials is not None for run in scoped)
        decisions, summary = evaluate_cot(scoped, pf, grader,
                                          trials=STORE_TRIALS if took_trials else None)
    except UserError as exc:  # a schedule the recorded probes cannot replay
        raise ValueError(str(exc)) from exc
    stopped = [i for i, d in enumerate(decisions) if d["stop_token"] is not None]
    same = dict(zip(stopped, grader.same_many([(scoped[i].final_answer, decisions[i]["answer"])
                                               for i in stopped])))
    changed = [not same.get(i, True) for i in range(len(scoped))]
    return Projection(summary.in_scope, summary.stopped, summary.net_saved,
                      changed_damage([run.group for run in scoped], changed))


def policy_savings(engine: Engine, policy: StoredPolicy, runs: Sequence[ObservedRun],
                   grader: Grader) -> PolicySavings:
    shadow, enforced = observed(read_decided(engine, policy.recorded_as), grader)
    try:
        return PolicySavings(policy, shadow, enforced, project(runs, policy, grader))
    except ValueError as exc:
        return PolicySavings(policy, shadow, enforced, None, str(exc))


def savings(engine: Engine, active_id: int | None, max_runs: int = MAX_RUNS,
            runs_from: Callable[[int], list[ObservedRun]] | None = None) -> Savings:
    """Savings of the active policy (by id) and of the newest stored one: bounded reads.

    The replay reads the newest `max_runs` runs through `runs_from` (a Parquet export, say),
    else from the store.
    """
    active = read_policy(engine, active_id) if active_id is not None else None
    newest = newest_policy(engine)
    if active is None and newest is None:
        return Savings(None, None)
    runs = runs_from(max_runs) if runs_from is not None else recent_runs(engine, max_runs)
    with Grader(workers=1) as grader:  # one thread: the dashboard's worker
        one = policy_savings(engine, active, runs, grader) if active else None
        if newest is not None and active is not None and newest.id == active.id:
            return Savings(one, one)
        two = policy_savings(engine, newest, runs, grader) if newest else None
    return Savings(one, two)
