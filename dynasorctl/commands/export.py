"""`dynasorctl export`: the store as Parquet, partitioned by day, incremental."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich import print as rprint
from sqlalchemy.exc import SQLAlchemyError

from dynasorctl.errors import UserError
from dynasorctl.options import DbOption, store


def export(
    out: Annotated[Path, typer.Option("--out", help="Directory of the export (created, or "
                                      "brought up to date).")],
    db: DbOption = None,
) -> None:
    """Write the store as Parquet (one directory per table and day); only changed days again."""
    from dynasorctl.export import export as run

    engine = store(db, migrate=False)
    started = time.perf_counter()
    try:
        done = run(engine, out, say=lambda line: rprint(f"  {line}"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise UserError(f"cannot read the store {engine.url.render_as_string()}: {reason}") from exc
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot write the export at {out}: {exc}") from exc
    rprint(f"exported {engine.url.render_as_string()} to {out}: {len(done.days_written)} days "
           f"written ({done.requests:,} requests, {done.probes:,} probes, {done.samples:,} "
           f"samples), {done.days_unchanged} unchanged, {done.labels:,} labels "
           f"({time.perf_counter() - started:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
