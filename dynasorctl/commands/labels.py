"""`dynasorctl labels`: gold answers for recorded requests, so calibration measures accuracy.

A label names one request (`request_id`) or one prompt (`prompt_hash`, the sha256
the store keeps): a prompt's label reaches every request with that prompt, recorded
before or after the import. Labels are only added; the newest one for a request or
a prompt is the one that counts, and a request's own label wins over its prompt's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, func, insert, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dynasorctl.errors import UserError
from dynasorctl.options import DbOption, store
from proxy.store.models import LabelRow, RequestRow

labels_app = typer.Typer(help="Gold answers for recorded requests: import, list.",
                         no_args_is_help=True)

_HASH = re.compile(r"[0-9a-f]{64}")
_ID_MAX = RequestRow.__table__.c.id.type.length  # type: ignore[attr-defined]
_SHOWN = 5  # unknown request ids named in the error
_CHUNK = 500  # ids per IN (...) query: well under every backend's parameter limit


class BadLine(ValueError):
    """A line that is not a label; the message says why (the caller adds file:line)."""


@dataclass(frozen=True, slots=True)
class Label:
    """One validated line: exactly one of request_id / prompt_hash is set."""

    line: int
    request_id: str | None
    prompt_hash: str | None
    gold: str


def parse_line(raw: str, line: int) -> Label:
    """One JSON Lines record as a label; BadLine says what is wrong with it."""
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise BadLine('expected an object like {"request_id": "...", "gold": "..."}')
    request_id, prompt_hash = data.get("request_id"), data.get("prompt_hash")
    if (request_id is None) == (prompt_hash is None):
        raise BadLine("give request_id or prompt_hash" if request_id is None
                      else "give request_id or prompt_hash, not both")
    if request_id is not None and (not isinstance(request_id, str) or not request_id
                                   or len(request_id) > _ID_MAX):
        raise BadLine(f"request_id must be a request id (a string of 1 to {_ID_MAX} "
                      f"characters), not {request_id!r}")
    if prompt_hash is not None:
        if not isinstance(prompt_hash, str) or not _HASH.fullmatch(prompt_hash.lower()):
            raise BadLine(f"prompt_hash must be 64 hex digits (sha256), not {prompt_hash!r}")
        prompt_hash = prompt_hash.lower()
    gold = data.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, str | int | float):
        raise BadLine("gold is missing" if gold is None
                      else f"gold must be a string or a number, not {json.dumps(gold)}")
    gold = gold if isinstance(gold, str) else json.dumps(gold)
    if not gold.strip():
        raise BadLine("gold is empty")
    return Label(line, request_id, prompt_hash, gold)


def parse_labels(lines: list[str], source: str) -> list[Label]:
    """Every line validated first; the first bad line (and how many more) as a UserError."""
    labels: list[Label] = []
    errors: list[str] = []
    seen: dict[tuple[str, str], Label] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            label = parse_line(raw, number)
        except BadLine as exc:
            errors.append(f"{source}:{number}: {exc}")
            continue
        key = ("request_id", label.request_id) if label.request_id else (
            "prompt_hash", label.prompt_hash or "")
        earlier = seen.get(key)
        if earlier is not None:
            if earlier.gold != label.gold:
                errors.append(f"{source}:{number}: {key[0]} {key[1]!r} is labelled "
                              f"{earlier.gold!r} on line {earlier.line} and {label.gold!r} here")
            continue  # a repeated line adds nothing
        seen[key] = label
        labels.append(label)
    if errors:
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise UserError(errors[0] + more)
    if not labels:
        raise UserError(f"{source}: holds no labels")
    return labels


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]


@dataclass(frozen=True, slots=True)
class Imported:
    labels: int
    requests: int  # recorded requests that this import labels
    unmatched_prompts: int  # prompt hashes no recorded request has yet
    replaced: int  # requests and prompts that had a label before


def import_labels(engine: Engine, labels: list[Label], source: str) -> Imported:
    """Check that every request id is recorded, then add all labels in one transaction."""
    ids = sorted({lab.request_id for lab in labels if lab.request_id})
    hashes = sorted({lab.prompt_hash for lab in labels if lab.prompt_hash})
    now = datetime.now(UTC)
    try:
        with Session(engine) as session, session.begin():
            known: set[str] = set()
            for chunk in _chunks(ids):
                known.update(session.scalars(select(RequestRow.id).where(RequestRow.id.in_(chunk))))
            unknown = [lab for lab in labels if lab.request_id and lab.request_id not in known]
            if unknown:
                shown = ", ".join(f"line {lab.line}: {lab.request_id!r}" for lab in unknown[:_SHOWN])
                more = f", and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
                raise UserError(f"{source}: {len(unknown)} request ids are not in the store "
                                f"({shown}{more}); nothing was imported")
            covered = set(ids)
            matched: set[str] = set()
            replaced = 0
            for chunk in _chunks(hashes):
                for rid, prompt in session.execute(select(RequestRow.id, RequestRow.prompt_hash)
                                                   .where(RequestRow.prompt_hash.in_(chunk))):
                    covered.add(rid)
                    matched.add(prompt)
                replaced += session.scalar(select(func.count(func.distinct(LabelRow.prompt_hash)))
                                           .where(LabelRow.prompt_hash.in_(chunk))) or 0
            for chunk in _chunks(ids):
                replaced += session.scalar(select(func.count(func.distinct(LabelRow.request_id)))
                                           .where(LabelRow.request_id.in_(chunk))) or 0
            session.execute(insert(LabelRow), [
                {"request_id": lab.request_id, "prompt_hash": lab.prompt_hash, "gold": lab.gold,
                 "source": source[:300], "created_at": now}
                for lab in labels
            ])
    except SQLAlchemyError as exc:
        raise UserError(f"cannot write labels to {engine.url.render_as_string()}: "
                        f"{str(getattr(exc, 'orig', None) or exc).splitlines()[0]}") from exc
    return Imported(len(labels), len(covered), len(set(hashes) - matched), replaced)


@labels_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(
        help='JSON Lines: {"request_id": ..., "gold": ...} or {"prompt_hash": ..., '
        '"gold": ...} a line; other fields are ignored.', show_default=False)],
    db: DbOption = None,
) -> None:
    """Import gold answers: every line is checked first, then all are added at once."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise UserError(f"{file}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: cannot read ({exc})") from exc
    labels = parse_labels(lines, str(file))
    done = import_labels(store(db), labels, str(file))
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"imported {done.labels} labels from {file}: {done.requests} recorded "
                  f"requests labelled")
    if done.replaced:
        console.print(f"{done.replaced} requests or prompts had a label before; the new one "
                      "now counts")
    if done.unmatched_prompts:
        console.print(f"{done.unmatched_prompts} prompt hashes match no recorded request yet; "
                      "requests with those prompts will get the label")


class Format(str, Enum):
    table = "table"
    json = "json"


@labels_app.command("list")
def list_(
    db: DbOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Most recent N labels.")] = 20,
    format: Annotated[Format, typer.Option(help="table for people, json for scripts.")] = Format.table,
) -> None:
    """List the most recently imported labels, with how many recorded requests each reaches."""
    engine = store(db, existing=True)
    try:
        with Session(engine) as session:
            reach = (select(func.count()).select_from(RequestRow)
                     .where(or_(RequestRow.id == LabelRow.request_id,
                                RequestRow.prompt_hash == LabelRow.prompt_hash))
                     .scalar_subquery())
            rows = session.execute(
                select(LabelRow, reach).order_by(LabelRow.created_at.desc(), LabelRow.id.desc())
                .limit(limit)).all()
            data = [{"created_at": lab.created_at.isoformat(), "request_id": lab.request_id,
                     "prompt_hash": lab.prompt_hash, "gold": lab.gold, "source": lab.source,
                     "requests": n} for lab, n in rows]
    except SQLAlchemyError as exc:
        raise UserError(f"cannot read the store: {exc}") from exc
    if format is Format.json:
        print(json.dumps(data))
        return
    console = Console(highlight=False)
    if not data:
        console.print("no labels imported yet")
        return
    table = Table(title=f"{len(data)} most recent labels")
    for col in ("created", "names", "gold", "requests", "source"):
        table.add_column(col, overflow="fold")
    for row in data:
        names = (f"request {row['request_id']}" if row["request_id"]
                 else f"prompt {row['prompt_hash'][:16]}…")
        table.add_row(row["created_at"][:19], names, row["gold"], str(row["requests"]),
                      row["source"])
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(labels_app, name="labels")
