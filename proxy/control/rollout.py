"""Rollout state: per scope, how far a chain-of-thought policy is rolled out; every change audited.

The state lives in the store, so every proxy on one store follows it (each reloads
it every second with `load_state`) and `dynasorctl rollout`, the admin API and the
guardrails all change it through the functions here. A scope is "*" (every
request), "model:NAME" or "key:NAME" (an API key's name); a request takes its key's
scope, else its model's, else "*". With no scope rows at all, proxies follow their
own flags.

Writers take the store's write lock before they read (SQLite: BEGIN IMMEDIATE;
PostgreSQL: a transaction-level advisory lock, then SELECT ... FOR UPDATE), so a change
never rests on a state another writer has replaced meanwhile: a promote that raced a kill
cannot undo it. Serialising every writer also makes audit ids commit in order, so the
state's version (the newest audit id) never skips a change another proxy has not seen. Each change
writes the scope row and one audit row per field in one transaction. Store failures
surface as SQLAlchemy errors; invalid changes as `RolloutError`, with nothing written.
"""

from __future__ import annotations

import getpass
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, Select, func, insert, select, text, update

from proxy.core.policy import PolicyFileError, parse_policy_file
from proxy.store.models import PolicyRow, RolloutAuditRow, RolloutScopeRow

MODES = ("off", "observe", "shadow", "enforce")
NEEDS_POLICY = ("shadow", "enforce")
LADDER = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)  # the enforced percent, one `promote` at a time
NAME_MAX = 200  # as long as a recorded model name
WHO_MAX = RolloutScopeRow.__table__.c.updated_by.type.length  # type: ignore[attr-defined]
GUARDRAIL = "guardrail"
KIND_NAMES = {"cot": "chain-of-thought (cot)", "sc": "self-consistency (sc)"}


class RolloutError(ValueError):
    """A change the rules refuse (bad scope, mode, percent or policy); nothing was written."""


@dataclass(frozen=True)
class ScopeState:
    """One scope's rollout, with its policy file's text so a proxy can parse it."""

    scope: str
    mode: str  # off | observe | shadow | enforce
    percent: float  # in enforce, the share enforced (0-100); the rest is shadowed
    policy_id: int | None
    policy_toml: str | None
    updated_at: datetime
    updated_by: str
    reason: str
    policy_version: int | None = None  # the policy's version within its (kind, model)
    policy_model: str | None = None  # the model the policy was calibrated for, "*" for all


@dataclass(frozen=True)
class RolloutState:
    scopes: dict[str, ScopeState]
    version: int  # changes whenever any scope does (the newest audit id); 0 before any change


@dataclass(frozen=True)
class AuditEntry:
    """One field of one scope changed; `previous` is None when the change created the scope."""

    id: int
    at: datetime
    scope: str
    field: str  # mode | percent | policy
    previous: str | None
    new: str | None
    reason: str
    who: str


@dataclass(frozen=True)
class _Fields:
    mode: str
    percent: float
    policy_id: int | None


NEW_SCOPE = _Fields("observe", 0.0, None)


# --- reading ----------------------------------------------------------------------------------


def current_user() -> str:
    """The operating-system user running this process, for the audit trail."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite drops the zone


def _states() -> Select:
    s, p = RolloutScopeRow, PolicyRow
    return (select(s.scope, s.mode, s.percent, s.policy_id, p.policy_toml, s.updated_at,
                   s.updated_by, s.reason, p.version, p.model)
            .outerjoin(p, p.id == s.policy_id))


def _state(row: Row[Any]) -> ScopeState:
    return ScopeState(row.scope, row.mode, float(row.percent), row.policy_id, row.policy_toml,
                      _utc(row.updated_at), row.updated_by, row.reason, row.version, row.model)


def load_state(engine: Engine) -> RolloutState:
    """Every scope with its policy, and the state's version: two indexed queries."""
    with engine.connect() as conn:
        # Version first: a change committed between the two reads then shows as a newer
        # version on the next load, never as this version with scopes this load missed.
        version = conn.scalar(select(func.max(RolloutAuditRow.id))) or 0
        scopes = {row.scope: _state(row) for row in conn.execute(_states())}
    return RolloutState(scopes, version)


def resolve(state: RolloutState, model: str | None, key_name: str | None) -> ScopeState | None:
    """The scope a request falls under: its key's, else its model's, else "*"; None if none."""
    for scope in (f"key:{key_name}" if key_name else None, f"model:{model}" if model else None, "*"):
        if scope is not None and scope in state.scopes:
            return state.scopes[scope]
    return None


def history(engine: Engine, limit: int = 50, scope: str | None = None) -> list[AuditEntry]:
    """The newest `limit` changes, newest first (of one scope if given)."""
    if limit < 1:
        raise RolloutError(f"limit must be at least 1, not {limit}")
    a = RolloutAuditRow
    query = select(a).order_by(a.id.desc()).limit(limit)
    if scope is not None:
        query = query.where(a.scope == check_scope(scope))
    with engine.connect() as conn:
        return [AuditEntry(r.id, _utc(r.at), r.scope, r.field, r.previous, r.new, r.reason, r.who)
                for r in conn.execute(query)]


# --- rules ------------------------------------------------------------------------------------


def check_scope(scope: str) -> str:
    """`scope` if it is "*", "model:NAME" or "key:NAME"; RolloutError otherwise."""
    if scope == "*":
        return scope
    kind, colon, name = scope.partition(":")
    if not colon or kind not in ("model", "key"):
        raise RolloutError(f'scope must be "*", "model:NAME" or "key:NAME", not {scope!r}')
    if not name or name != name.strip() or not name.isprintable() or len(name) > NAME_MAX:
        raise RolloutError(f"scope {scope!r}: the {kind} name must be 1 to {NAME_MAX} printable "
                           "characters, without surrounding spaces")
    return scope


def scope_model(scope: str) -> str | None:
    """The model a scope is about ("model:NAME"), None for "*" and key scopes."""
    return scope.removeprefix("model:") if scope.startswith("model:") else None


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise RolloutError(f"unknown mode {mode!r}: give one of {', '.join(MODES)}")
    return mode


def _check_percent(percent: float) -> float:
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise RolloutError(f"percent must be a number from 0 to 100, not {percent!r}")
    if not (math.isfinite(percent) and 0 <= percent <= 100):
        raise RolloutError(f"percent must be from 0 to 100, not {percent:g}")
    return float(percent)


def _check_reason(reason: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise RolloutError("a reason is required: say why, it is kept in the audit trail")
    return reason.strip()


def _check_who(who: str) -> str:
    if not isinstance(who, str) or not who.strip():
        raise RolloutError("who made the change is required")
    return who.strip()[:WHO_MAX]


def _policy_id(conn: Connection, scope: str, policy: int | str) -> int:
    """The policies row `policy` names (an id, "latest" or "latest-sc"), checked to suit `scope`."""
    model = scope_model(scope)
    latest = {"latest": "cot", "latest-sc": "sc"}.get(policy.strip().lower()) if isinstance(policy, str) else None
    if latest is not None:
        p = PolicyRow
        for candidate in ([model] if model else []) + ["*"]:
            found = conn.scalar(select(p.id).where(p.kind == latest, p.model == candidate)
                                .order_by(p.version.desc()).limit(1))
            if found is not None:
                return _suitable(conn, scope, found)
        where = f"model {model!r} or for every model" if model else "every model (\"*\")"
        raise RolloutError(f"no {KIND_NAMES[latest]} policy for {where} in the store: "
                           "calibrate one first (dynasorctl calibrate)")
    if isinstance(policy, str) and policy.strip().isascii() and policy.strip().isdigit():
        policy = int(policy.strip())
    if isinstance(policy, bool) or not isinstance(policy, int):
        raise RolloutError(f'policy must be a policy id, "latest" or "latest-sc", not {policy!r}')
    return _suitable(conn, scope, policy)


def _suitable(conn: Connection, scope: str, policy_id: int) -> int:
    row = conn.execute(select(PolicyRow.kind, PolicyRow.policy_toml)
                       .where(PolicyRow.id == policy_id)).one_or_none()
    if row is None:
        raise RolloutError(f"no policy {policy_id} in the store")
    try:
        parsed = parse_policy_file(row.policy_toml, f"policy {policy_id}")
    except PolicyFileError as exc:
        raise RolloutError(f"{exc}; it cannot be rolled out") from exc
    if parsed.kind != row.kind:
        raise RolloutError(f"policy {policy_id} is stored as {KIND_NAMES.get(row.kind, row.kind)} "
                           f"but holds a {KIND_NAMES[parsed.kind]} policy file; it cannot be rolled out")
    # A policy is certified on its model's data only: it may not reach other models.
    if parsed.model != "*" and parsed.model != scope_model(scope):
        raise RolloutError(f"policy {policy_id} is for model {parsed.model!r} only: use it at "
                           f"scope model:{parsed.model}, or choose a policy for every model")
    return policy_id


def _check_complete(scope: str, after: _Fields) -> None:
    if after.mode in NEEDS_POLICY and after.policy_id is None:
        raise RolloutError(f"scope {scope!r}: {after.mode} needs a policy; "
                           'choose one by its id, as "latest" or as "latest-sc"')


# --- writing ----------------------------------------------------------------------------------


ROLLOUT_LOCK = 0x64796E61736F73  # PostgreSQL advisory lock of rollout writers


@contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the write lock from its first read (see the module's doc)."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            # pysqlite only begins a transaction at the first write; reads before it would
            # see a state another writer may replace before ours lands.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            # Row locks cannot cover a scope not written yet (two creators would collide);
            # held until commit or rollback.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ROLLOUT_LOCK})
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


def _read(conn: Connection, scope: str) -> _Fields | None:
    s = RolloutScopeRow
    row = conn.execute(select(s.mode, s.percent, s.policy_id).where(s.scope == scope)
                       .with_for_update()).one_or_none()
    return None if row is None else _Fields(row.mode, float(row.percent), row.policy_id)


def _shown(field: str, value: Any) -> str | None:
    if value is None:
        return None
    # 5.0 is kept as "5"; a fractional percent keeps all its digits (repr round-trips).
    if field == "percent":
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


def _write(conn: Connection, scope: str, before: _Fields | None, after: _Fields, *,
           reason: str, who: str, chosen: int | None = None) -> None:
    """Store `after` with one audit row per changed field; nothing when nothing changed."""
    now = datetime.now(UTC)
    changed = [
        {"at": now, "scope": scope, "field": field, "reason": reason, "who": who,
         "previous": None if before is None else _shown(field, getattr(before, attr)),
         "new": _shown(field, getattr(after, attr))}
        for field, attr in (("mode", "mode"), ("percent", "percent"), ("policy", "policy_id"))
        if (getattr(before, attr) != getattr(after, attr) if before is not None
            else getattr(after, attr) is not None)
    ]
    if chosen is not None:
        conn.execute(update(PolicyRow).where(PolicyRow.id == chosen).values(active=True))
    if not changed:
        return
    values = {"mode": after.mode, "percent": after.percent, "policy_id": after.policy_id,
              "updated_at": now, "updated_by": who, "reason": reason}
    s = RolloutScopeRow
    if before is None:
        conn.execute(insert(s).values(scope=scope, **values))
    else:
        conn.execute(update(s).where(s.scope == scope).values(**values))
    conn.execute(insert(RolloutAuditRow), changed)
    old = before.policy_id if before is not None else None
    if old is not None and old != after.policy_id:
        # `active` means "some scope rolls it out": a policy no scope names any more is not.
        still = conn.scalar(select(func.count()).select_from(s).where(s.policy_id == old))
        if not still:
            conn.execute(update(PolicyRow).where(PolicyRow.id == old).values(active=False))


def _after_write(conn: Connection, scope: str) -> ScopeState | None:
    row = conn.execute(_states().where(RolloutScopeRow.scope == scope)).one_or_none()
    return None if row is None else _state(row)


def set_scope(engine: Engine, scope: str, *, mode: str | None = None,
              percent: float | None = None, policy: int | str | None = None,
              reason: str, who: str) -> ScopeState:
    """Change what is given of one scope (a new one starts in observe, 0%, no policy)."""
    scope = check_scope(scope)
    reason, who = _check_reason(reason), _check_who(who)
    if mode is not None:
        _check_mode(mode)
    if percent is not None:
        percent = _check_percent(percent)
    with _writing(engine) as conn:
        before = _read(conn, scope)
        current = before or NEW_SCOPE
        chosen = _policy_id(conn, scope, policy) if policy is not None else None
        after = _Fields(mode if mode is not None else current.mode,
                        percent if percent is not None else current.percent,
                        chosen if chosen is not None else current.policy_id)
        _check_complete(scope, after)
        _write(conn, scope, before, after, reason=reason, who=who, chosen=chosen)
        state = _after_write(conn, scope)
    assert state is not None
    return state


def promote(engine: Engine, scope: str, *, reason: str, who: str) -> ScopeState:
    """The next step of the ladder (1, 5, 10, 25, 50, 100% enforced); not enforcing yet: 1%."""
    scope = check_scope(scope)
    reason, who = _check_reason(reason), _check_who(who)
    with _writing(engine) as conn:
        before = _read(conn, scope)
        current = before or NEW_SCOPE
        if current.mode == "enforce":
            step = next((p for p in LADDER if p > current.percent), None)
            if step is None:
                raise RolloutError(f"scope {scope!r} is already at 100%")
            after = replace(current, percent=step)
        else:
            after = replace(current, mode="enforce", percent=LADDER[0])
        _check_complete(scope, after)
        _write(conn, scope, before, after, reason=reason, who=who)
        state = _after_write(conn, scope)
    assert state is not None
    return state


def kill(engine: Engine, *, reason: str, who: str) -> list[ScopeState]:
    """Every shadowed or enforced scope back to observe (0%); the scopes it changed.

    Scopes that are off stay off (they were neither shadowed nor enforced). A "*"
    scope in observe is written if there is none, so that proxies whose flags say
    shadow or enforce are stopped too.
    """
    reason, who = _check_reason(reason), _check_who(who)
    s = RolloutScopeRow
    with _writing(engine) as conn:
        rows = {r.scope: _Fields(r.mode, float(r.percent), r.policy_id)
                for r in conn.execute(select(s.scope, s.mode, s.percent, s.policy_id)
                                      .order_by(s.scope).with_for_update())}
        changed = []
        for scope, before in rows.items():
            if before.mode in NEEDS_POLICY:
                _write(conn, scope, before, replace(before, mode="observe", percent=0.0),
                       reason=reason, who=who)
                changed.append(scope)
        if "*" not in rows:
            _write(conn, "*", None, NEW_SCOPE, reason=reason, who=who)
            changed.append("*")
        states = [_after_write(conn, scope) for scope in changed]
    return [state for state in states if state is not None]


def rollback(engine: Engine, scope: str, *, reason: str) -> ScopeState:
    """An enforced scope back to shadow, by the guardrail; any other scope is left as it is."""
    scope = check_scope(scope)
    reason = _check_reason(reason)
    with _writing(engine) as conn:
        before = _read(conn, scope)
        if before is None:
            raise RolloutError(f"scope {scope!r} is not in the store")
        if before.mode == "enforce":
            _write(conn, scope, before, replace(before, mode="shadow"), reason=reason,
                   who=GUARDRAIL)
        state = _after_write(conn, scope)
    assert state is not None
    return state
