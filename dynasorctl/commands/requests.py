"""`dynasorctl requests`: what the proxy recorded, as rich tables or JSON."""

from __future__ import annotations

import json
from datetime import datetime
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dynasorctl.errors import UserError
from dynasorctl.options import DbOption, store
from proxy.store.models import ProbeRow, RequestRow, SampleRow

requests_app = typer.Typer(help="Recorded requests: list, show.", no_args_is_help=True)


class Format(str, Enum):
    table = "table"
    json = "json"


LIST_COLUMNS = ("id", "created_at", "model", "kind", "status_code", "completion_tokens",
                "finish_reason", "probe_count", "final_answer", "latency_ms")


def _row(obj: Any, columns: tuple[str, ...] | None = None) -> dict[str, Any]:
    names = columns or tuple(c.key for c in obj.__table__.columns)
    out = {}
    for name in names:
        value = getattr(obj, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


@requests_app.command("list")
def list_(
    db: DbOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Most recent N requests.")] = 20,
    format: Annotated[Format, typer.Option(help="table for people, json for scripts.")] = Format.table,
) -> None:
    """List the most recent recorded requests."""
    engine = store(db, existing=True)
    try:
        with Session(engine) as session:
            rows = session.scalars(
                select(RequestRow).order_by(RequestRow.created_at.desc()).limit(limit)
            ).all()
            data = [_row(r, LIST_COLUMNS) for r in rows]
    except SQLAlchemyError as exc:
        raise UserError(f"cannot read the store: {exc}") from exc
    if format is Format.json:
        print(json.dumps(data, indent=None))
        return
    if not data:
        Console(markup=False).print("no requests recorded yet")
        return
    table = Table(title=f"{len(data)} most recent requests")
    for col in LIST_COLUMNS:
        table.add_column(col.replace("_", " "), overflow="fold")
    for row in data:
        row = {**row, "id": row["id"][:12], "created_at": row["created_at"][:19]}
        table.add_row(*(_fmt(row[c]) for c in LIST_COLUMNS))
    Console(markup=False).print(table)


@requests_app.command()
def show(
    request_id: Annotated[str, typer.Argument(help="Request id (a unique prefix will do).")],
    db: DbOption = None,
    format: Annotated[Format, typer.Option(help="table for people, json for scripts.")] = Format.table,
) -> None:
    """Show one request with its probes and program samples."""
    engine = store(db, existing=True)
    try:
        with Session(engine) as session:
            matches = session.scalars(
                select(RequestRow).where(RequestRow.id.startswith(request_id)).limit(2)
            ).all()
            if not matches:
                raise UserError(f"no recorded request with id {request_id!r}")
            if len(matches) > 1:
                raise UserError(f"id prefix {request_id!r} is ambiguous; give more characters")
            req = matches[0]
            probes = session.scalars(
                select(ProbeRow).where(ProbeRow.request_id == req.id).order_by(ProbeRow.position)
            ).all()
            samples = session.scalars(
                select(SampleRow).where(SampleRow.request_id == req.id).order_by(SampleRow.sample_index)
            ).all()
            data = {**_row(req), "probes": [_row(p) for p in probes], "samples": [_row(s) for s in samples]}
    except SQLAlchemyError as exc:
        raise UserError(f"cannot read the store: {exc}") from exc
    if format is Format.json:
        print(json.dumps(data))
        return
    console = Console(markup=False)  # recorded text (answers like [1, 2]) shown as it is
    head = Table(show_header=False, title=f"request {data['id']}")
    for key, value in data.items():
        if key not in ("probes", "samples", "id"):
            head.add_row(key.replace("_", " "), _fmt(value))
    console.print(head)
    if data["probes"]:
        table = Table(title="probes")
        for col in ("position", "answer", "hesitant", "certaindex", "output_tokens", "latency_ms", "status"):
            table.add_column(col.replace("_", " "))
        for p in data["probes"]:
            table.add_row(*(_fmt(p[c]) for c in ("position", "answer", "hesitant", "certaindex",
                                                  "output_tokens", "latency_ms", "status")))
        console.print(table)
    if data["samples"]:
        table = Table(title=f"program {req.program_id} samples")
        for col in ("sample_index", "choice_index", "answer", "answer_group", "certaindex",
                    "completion_tokens", "finish_reason"):
            table.add_column(col.replace("_", " "))
        for s in data["samples"]:
            table.add_row(*(_fmt(s[c]) for c in ("sample_index", "choice_index", "answer", "answer_group",
                                                  "certaindex", "completion_tokens", "finish_reason")))
        console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(requests_app, name="requests")
