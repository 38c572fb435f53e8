"""What the dashboard reads from the store: bounded queries returning plain dataclasses.

Every query is bounded, by a time window over the indexed `requests.created_at`, by
LIMIT, or by one request's id (`ix_probes_request_position`). Store failures surface
as `SourceError` with a one-line reason; nothing here retries or caches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

from sqlalchemy import ColumnElement, Engine, and_, case, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from dynasorctl.dashboard.calibrate import (
    CalibrationResult,
    CalibrationSettings,
    Progress,
    run_calibration,
)
from dynasorctl.dashboard.savings import Savings, StoredPolicy, newest_policy
from dynasorctl.dashboard.savings import savings as read_savings
from dynasorctl.errors import UserError
from proxy.control import rollout
from proxy.control.rollout import AuditEntry, ScopeState
from proxy.core.policy import PAPER_DEFAULT, CotPolicy, ProbeObservation, first_stop
from proxy.store.models import ProbeRow, RequestRow

Clock = Callable[[], datetime]
T = TypeVar("T")
OUTCOMES = ("ok", "error", "enforced")  # how a request ended, as the filter names it
CERTAINDEX_BINS = 10
RECENT_PROBE_REQUESTS = 2000  # the certaindex histogram reads the probes of this many requests
MAX_LIST = 500
MAX_PROBES = 1000  # per request: 64-token probes over 64k tokens


class SourceError(Exception):
    """The store could not be read; the message is one line, fit for a banner."""


@dataclass(frozen=True)
class Traffic:
    """Traffic over the last `window_s` seconds, and its requests per bucket (oldest first)."""

    window_s: float
    requests: int
    errors: int
    completion_tokens: int
    probe_tokens: int
    buckets: list[int]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.window_s

    @property
    def probe_share(self) -> float:
        """Probe tokens as a share of all tokens decoded (main plus probes)."""
        total = self.completion_tokens + self.probe_tokens
        return self.probe_tokens / total if total else 0.0


@dataclass(frozen=True)
class RequestSummary:
    id: str
    created_at: datetime
    model: str | None
    mode: str
    status_code: int
    outcome: str  # ok | error | enforced
    completion_tokens: int | None
    probe_count: int
    final_answer: str | None


@dataclass(frozen=True)
class Filters:
    model: str | None = None
    mode: str | None = None
    outcome: str | None = None

    @classmethod
    def parse(cls, text: str) -> Filters:
        """`model:M mode:X outcome:Y`, or bare words: a mode, an outcome, else a model."""
        found: dict[str, str] = {}
        for word in text.split():
            key, colon, value = word.partition(":")
            if colon and key in ("model", "mode", "outcome") and value:
                found[key] = value
            elif word in rollout.MODES:
                found["mode"] = word
            elif word in OUTCOMES:
                found["outcome"] = word
            else:
                found["model"] = word
        return cls(**found)


@dataclass(frozen=True)
class ProbePoint:
    position: int
    answer: str | None
    hesitant: bool
    certaindex: float | None
    kind: str = "periodic"  # periodic | statement | trial | check
    confidence: float | None = None  # the answer's mean token probability, where measured
    trigger_position: int | None = None  # where its statement or transition word was complete


@dataclass(frozen=True)
class Timeline:
    """One request's probes (choice 0, ok ones) and where a policy would have stopped."""

    request: RequestSummary
    probes: list[ProbePoint]
    stop_index: int | None  # the probe at which `PAPER_DEFAULT` stops, None if it never does
    stop_answer: str | None
    stop_reason: str
    decision_token: int | None  # where the live policy stopped (shadow/enforce), if it did
    decision_answer: str | None
    stop_source: str | None = None  # where the live stop's answer came from: probe, trial, text

    @property
    def stop_position(self) -> int | None:
        return None if self.stop_index is None else self.probes[self.stop_index].position


@dataclass(frozen=True)
class Rollout:
    scopes: list[ScopeState]
    history: list[AuditEntry]

    @property
    def live_scopes(self) -> list[ScopeState]:
        """The scopes that shadow or enforce: what a promote or a switch most likely means."""
        return [s for s in self.scopes if s.mode in rollout.NEEDS_POLICY]

    @property
    def active_policy(self) -> int | None:
        """The policy the rollout uses: a live scope's, else any scope's; None if none has one."""
        for s in self.live_scopes + self.scopes:
            if s.policy_id is not None:
                return s.policy_id
        return None


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite drops the zone


def _reason(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _outcome() -> ColumnElement[str]:
    r = RequestRow
    return case((or_(r.status_code >= 400, r.error.is_not(None)), "error"),
                (r.enforced.is_(True), "enforced"), else_="ok")


class StoreSource:
    """The dashboard's reads over one store engine, and the rollout changes it offers."""

    def __init__(self, engine: Engine, clock: Clock | None = None,
                 policy: CotPolicy = PAPER_DEFAULT, parquet: Path | None = None) -> None:
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(UTC))
        self.policy = policy
        self.parquet = parquet  # a Parquet export the savings replay reads instead of the store

    def now(self) -> datetime:
        return self._clock()

    def _run(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except SQLAlchemyError as exc:
            reason = _reason(exc)
            if "no such table" in reason or "no such column" in reason:
                reason += " (an empty or old store: run `dynasorctl db upgrade`)"
            raise SourceError(f"store error: {reason}") from exc
        except UserError as exc:  # a Parquet export that cannot be read
            raise SourceError(str(exc)) from exc

    # --- traffic ------------------------------------------------------------------------------

    def traffic(self, minutes: float = 5.0, buckets: int = 30) -> Traffic:
        """Counts over the last `minutes`: one scan of the created_at index, bucketed in SQL."""
        end = self.now()
        start = end - timedelta(minutes=minutes)
        step = (end - start) / buckets
        r = RequestRow
        edges = [start + step * i for i in range(buckets + 1)]
        per_bucket = [func.sum(case((and_(r.created_at >= lo, r.created_at < hi), 1), else_=0))
                      for lo, hi in pairwise(edges)]
        query = (select(func.count(), func.sum(case((or_(r.status_code >= 400, r.error.is_not(None)), 1),
                                                    else_=0)),
                        func.coalesce(func.sum(r.completion_tokens), 0),
                        func.coalesce(func.sum(r.probe_tokens), 0), *per_bucket)
                 .where(r.created_at >= start, r.created_at < end))

        def read() -> Traffic:
            with self.engine.connect() as conn:
                row = conn.execute(query).one()
            return Traffic(minutes * 60, int(row[0]), int(row[1] or 0), int(row[2]), int(row[3]),
                           [int(b or 0) for b in row[4:]])

        return self._run(read)

    def certaindex_histogram(self, minutes: float = 5.0) -> list[int]:
        """Probes per certaindex bin ([0, 0.1), ..., [0.9, 1]) of the newest recent requests."""
        since = self.now() - timedelta(minutes=minutes)
        r, p = RequestRow, ProbeRow
        recent = (select(r.id).where(r.created_at >= since).order_by(r.created_at.desc())
                  .limit(RECENT_PROBE_REQUESTS).subquery())
        width = 1.0 / CERTAINDEX_BINS
        bins = []
        for i in range(CERTAINDEX_BINS):
            lo, hi = i * width, (i + 1) * width
            if i == 0:
                inside = p.certaindex < hi
            elif i == CERTAINDEX_BINS - 1:
                inside = p.certaindex >= lo
            else:
                inside = and_(p.certaindex >= lo, p.certaindex < hi)
            bins.append(func.sum(case((inside, 1), else_=0)))
        query = (select(*bins).select_from(p).join(recent, recent.c.id == p.request_id)
                 .where(p.status == "ok", p.certaindex.is_not(None)))

        def read() -> list[int]:
            with self.engine.connect() as conn:
                row = conn.execute(query).one()
            return [int(v or 0) for v in row]

        return self._run(read)

    # --- requests -----------------------------------------------------------------------------

    def requests(self, filters: Filters = Filters(), limit: int = 100) -> list[RequestSummary]:
        """The newest requests matching `filters`, newest first, at most `limit` (<= 500)."""
        r = RequestRow
        outcome = _outcome()
        query = (select(r.id, r.created_at, r.model, r.mode, r.status_code, outcome.label("outcome"),
                        r.completion_tokens, r.probe_count, r.final_answer)
                 .order_by(r.created_at.desc()).limit(max(1, min(limit, MAX_LIST))))
        if filters.model:
            query = query.where(r.model == filters.model)  # ix_requests_model
        if filters.mode:
            query = query.where(r.mode == filters.mode)
        if filters.outcome:
            query = query.where(outcome == filters.outcome)

        def read() -> list[RequestSummary]:
            with self.engine.connect() as conn:
                return [RequestSummary(row.id, _utc(row.created_at), row.model, row.mode,
                                       row.status_code, row.outcome, row.completion_tokens,
                                       row.probe_count, row.final_answer)
                        for row in conn.execute(query)]

        return self._run(read)

    def timeline(self, request_id: str) -> Timeline | None:
        """One request's probes and where the policy (the paper's rule) would have stopped."""
        r, p = RequestRow, ProbeRow
        head = select(r.id, r.created_at, r.model, r.mode, r.status_code, _outcome().label("outcome"),
                      r.completion_tokens, r.probe_count, r.final_answer, r.decision_token,
                      r.decision_answer, r.stop_source).where(r.id == request_id)
        probes = (select(p.position, p.answer, p.hesitant, p.output_tokens, p.certaindex, p.kind,
                         p.confidence, p.trigger_position)
                  .where(p.request_id == request_id, p.choice_index == 0, p.status == "ok")
                  .order_by(p.position).limit(MAX_PROBES))

        def read() -> Timeline | None:
            with self.engine.connect() as conn:
                row = conn.execute(head).one_or_none()
                if row is None:
                    return None
                rows = conn.execute(probes).all()
            summary = RequestSummary(row.id, _utc(row.created_at), row.model, row.mode,
                                     row.status_code, row.outcome, row.completion_tokens,
                                     row.probe_count, row.final_answer)
            points = [ProbePoint(q.position, q.answer, bool(q.hesitant), q.certaindex, q.kind,
                                 q.confidence, q.trigger_position) for q in rows]
            # The paper's rule reads the periodic probes; trials are not its to take.
            obs = [ProbeObservation(q.position, q.answer, bool(q.hesitant), q.output_tokens or 0,
                                    confidence=q.confidence, trial=q.kind == "trial")
                   for q in rows]
            index, decision = first_stop(self.policy, obs)
            return Timeline(summary, points, index, decision.answer, decision.reason,
                            row.decision_token, row.decision_answer, row.stop_source)

        return self._run(read)

    # --- rollout ------------------------------------------------------------------------------

    def rollout(self, history: int = 8) -> Rollout:
        """Every scope (there are few) and the newest `history` audit entries."""

        def read() -> Rollout:
            state = rollout.load_state(self.engine)
            return Rollout(sorted(state.scopes.values(), key=lambda s: s.scope),
                           rollout.history(self.engine, limit=history))

        return self._run(read)

    # --- savings ------------------------------------------------------------------------------

    def newest_policy(self) -> StoredPolicy | None:
        """The newest stored chain-of-thought policy (one row by its primary key)."""
        return self._run(lambda: newest_policy(self.engine))

    def savings(self, active_policy: int | None) -> Savings:
        """Observed and projected savings of the active and the newest policy (slow: a worker)."""
        runs_from = None
        if self.parquet is not None:
            from dynasorctl.calibration import parquet_source

            export = self.parquet
            runs_from = lambda n: parquet_source.load_runs(export, newest=n).runs
        return self._run(lambda: read_savings(self.engine, active_policy, runs_from=runs_from))

    def calibrate(self, settings: CalibrationSettings,
                  progress: Progress | None = None) -> CalibrationResult:
        """`dynasorctl calibrate --db` on the newest probed requests (slow: a worker)."""
        return self._run(lambda: run_calibration(self.engine, settings, progress))

    # --- rollout changes: the same functions as `dynasorctl rollout` ----------------------------

    def promote(self, scope: str, reason: str) -> ScopeState:
        """One step up the ladder for `scope`; RolloutError if the rules refuse it."""
        return self._run(lambda: rollout.promote(self.engine, scope, reason=reason,
                                                 who=rollout.current_user()))

    def set_percent(self, scope: str, percent: float, reason: str) -> ScopeState:
        """Enforce `percent` of `scope`'s requests (`rollout set --mode enforce --percent`)."""
        return self._run(lambda: rollout.set_scope(self.engine, scope, mode="enforce",
                                                   percent=percent, reason=reason,
                                                   who=rollout.current_user()))

    def switch_policy(self, scope: str, policy: str, reason: str) -> ScopeState:
        """`scope` decides with stored policy `policy` (an id or "latest"; `rollout set --policy`)."""
        return self._run(lambda: rollout.set_scope(self.engine, scope, policy=policy,
                                                   reason=reason, who=rollout.current_user()))

    def kill(self, reason: str) -> list[ScopeState]:
        """Every shadowed or enforced scope back to observe; the scopes changed."""
        return self._run(lambda: rollout.kill(self.engine, reason=reason, who=rollout.current_user()))
