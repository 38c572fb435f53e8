"""`dynasorctl rollout`: how far a policy is rolled out, per scope, changed with a reason.

The state lives in the store (`proxy.control.rollout`); every proxy on that store follows a
change within a second. Every change is audited with who made it and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from dynasorctl.errors import UserError
from dynasorctl.options import DbOption, store
from proxy.control import rollout
from proxy.control.rollout import AuditEntry, RolloutError, ScopeState
from proxy.store.db import StoreError

rollout_app = typer.Typer(
    help="Roll a policy out per scope: status, set, promote, kill, history. Proxies on the "
    "store follow each change within a second.",
    no_args_is_help=True,
)

STATUS_HISTORY = 5  # changes shown by `status`

ScopeOption = Annotated[str, typer.Option(
    "--scope", help='"*" (every request), "model:NAME", or "key:NAME" (an API key\'s name); '
    "a request takes its key's scope, else its model's, else \"*\".")]
ReasonOption = Annotated[str | None, typer.Option(
    "--reason", help="Why (required; kept in the audit trail).", show_default=False)]


class Format(str, Enum):
    table = "table"
    json = "json"


FormatOption = Annotated[Format, typer.Option(help="table for people, json for scripts.")]


@contextmanager
def _edge() -> Iterator[None]:
    """Rollout and store errors become one-line user errors; nothing was changed."""
    try:
        yield
    except (RolloutError, StoreError) as exc:
        raise UserError(str(exc)) from exc
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise UserError(f"the store failed, nothing was changed: {reason}") from exc


def _reason(reason: str | None) -> str:
    if reason is None or not reason.strip():
        raise UserError("--reason is required: say why, it is kept in the audit trail")
    return reason


def _treatment(s: ScopeState) -> str:
    if s.mode == "enforce":
        return f"enforce {s.percent:g}% (the rest shadow)"
    return s.mode


def _policy(s: ScopeState) -> str:
    if s.policy_id is None:
        return "none"
    return f"{s.policy_id} (model {s.policy_model!r}, version {s.policy_version})"


def _describe(s: ScopeState) -> str:
    return f"scope {s.scope!r}: {_treatment(s)}, policy {_policy(s)}"


def _scope_json(s: ScopeState) -> dict[str, Any]:
    return {"scope": s.scope, "mode": s.mode, "percent": s.percent, "policy_id": s.policy_id,
            "policy_version": s.policy_version, "policy_model": s.policy_model,
            "updated_at": s.updated_at.isoformat(), "updated_by": s.updated_by,
            "reason": s.reason}


def _entry_json(e: AuditEntry) -> dict[str, Any]:
    return {"id": e.id, "at": e.at.isoformat(), "scope": e.scope, "field": e.field,
            "previous": e.previous, "new": e.new, "reason": e.reason, "who": e.who}


def _history_table(entries: list[AuditEntry], title: str) -> Table:
    table = Table(title=title)
    for col in ("when (UTC)", "who", "scope", "change", "reason"):
        table.add_column(col, overflow="fold")
    for e in entries:
        change = f"{e.field}: {e.previous or '(new)'} → {e.new or 'none'}"
        table.add_row(e.at.strftime("%Y-%m-%d %H:%M:%S"), e.who, e.scope, change, e.reason)
    return table


def _console() -> Console:
    # Scopes, reasons and names are the operator's text: shown as typed, not as markup.
    return Console(highlight=False, soft_wrap=True, markup=False)


def _print_change(s: ScopeState) -> None:
    console = _console()
    console.print(_describe(s))
    if s.mode == "enforce" and s.percent == 0:
        console.print("note: enforce at 0% enforces no request (all are shadowed); "
                      "`dynasorctl rollout promote` steps it to 1%")
    console.print("proxies on this store follow within a second")


@rollout_app.command()
def status(db: DbOption = None, format: FormatOption = Format.table) -> None:
    """Every scope, its treatment and policy, and the last changes."""
    engine = store(db, existing=True)
    with _edge():
        state = rollout.load_state(engine)
        recent = rollout.history(engine, STATUS_HISTORY)
    scopes = [state.scopes[k] for k in sorted(state.scopes, key=_precedence)]
    if format is Format.json:
        print(json.dumps({"version": state.version, "scopes": [_scope_json(s) for s in scopes],
                          "history": [_entry_json(e) for e in recent]}))
        return
    console = _console()
    if not scopes:
        console.print("no rollout in the store: every proxy follows its own flags "
                      "(--mode, --policy, --enforce-percent)")
    else:
        table = Table(title="Rollout (a request takes its key's scope, else its model's, "
                      "else \"*\")")
        for col in ("scope", "treatment", "policy", "updated (UTC)", "by", "reason"):
            table.add_column(col, overflow="fold")
        for s in scopes:
            table.add_row(s.scope, _treatment(s), _policy(s),
                          s.updated_at.strftime("%Y-%m-%d %H:%M:%S"), s.updated_by, s.reason)
        console.print(table)
    if recent:
        console.print(_history_table(recent, f"Last {len(recent)} changes"))


def _precedence(scope: str) -> tuple[int, str]:
    return ({"key": 0, "model": 1}.get(scope.partition(":")[0], 2), scope)


@rollout_app.command("set")
def set_(
    mode: Annotated[str | None, typer.Option(
        help="off | observe | shadow | enforce. A new scope starts in observe.",
        show_default=False)] = None,
    percent: Annotated[float | None, typer.Option(
        help="In enforce, the share of requests enforced, 0-100 (the rest are shadowed). "
        "A new scope starts at 0.", show_default=False)] = None,
    scope: ScopeOption = "*",
    policy: Annotated[str | None, typer.Option(
        help='A stored policy\'s id, "latest" (the newest chain-of-thought policy for the '
        'scope\'s model, else for every model) or "latest-sc" (the same, self-consistency). '
        'Shadow and enforce need one.',
        show_default=False)] = None,
    reason: ReasonOption = None,
    db: DbOption = None,
) -> None:
    """Change a scope's mode, percent or policy; what is not given stays as it is."""
    reason = _reason(reason)
    if mode is None and percent is None and policy is None:
        raise UserError("nothing to change: give --mode, --percent or --policy")
    engine = store(db)
    with _edge():
        state = rollout.set_scope(engine, scope, mode=mode, percent=percent, policy=policy,
                                  reason=reason, who=rollout.current_user())
    _print_change(state)


@rollout_app.command()
def promote(scope: ScopeOption = "*", reason: ReasonOption = None,
            db: DbOption = None) -> None:
    """Enforce on a larger share: 1, 5, 10, 25, 50, 100% (from observe or shadow: 1%)."""
    reason = _reason(reason)
    engine = store(db)
    with _edge():
        state = rollout.promote(engine, scope, reason=reason, who=rollout.current_user())
    _print_change(state)


@rollout_app.command()
def kill(reason: ReasonOption = None, db: DbOption = None) -> None:
    """Stop all shadowing and enforcing now: every such scope back to observe."""
    reason = _reason(reason)
    engine = store(db)
    with _edge():
        changed = rollout.kill(engine, reason=reason, who=rollout.current_user())
    console = _console()
    names = f" ({', '.join(s.scope for s in changed)})" if changed else ""
    console.print(f"{len(changed)} scope{'' if len(changed) == 1 else 's'} put back to "
                  f"observe{names}; proxies on this store follow within a second")


@rollout_app.command()
def history(
    limit: Annotated[int, typer.Option(min=1, help="Most recent N changes.")] = 50,
    scope: Annotated[str | None, typer.Option(
        "--scope", help="Only this scope's changes.", show_default=False)] = None,
    format: FormatOption = Format.table,
    db: DbOption = None,
) -> None:
    """The audit trail: every change, newest first, with who made it and why."""
    engine = store(db, existing=True)
    with _edge():
        entries = rollout.history(engine, limit, scope)
    if format is Format.json:
        print(json.dumps([_entry_json(e) for e in entries]))
        return
    console = _console()
    if not entries:
        console.print("no rollout changes yet")
        return
    console.print(_history_table(entries, f"{len(entries)} most recent changes"))


def register(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")
