"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import Engine

from dynasorctl.errors import UserError
from proxy.store.db import StoreError, open_store

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="SQLAlchemy URL of the store. Default: $DYNASOR_DB_URL, else "
        "sqlite:///$XDG_DATA_HOME/dynasor/dynasor.db (~/.local/share).",
        show_default=False,
    ),
]


# The proxy's settings that `observe` and `serve` both take as flags.
HostOption = Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")]
PortOption = Annotated[int | None, typer.Option(help="Port to listen on [default: 8080].")]
ProbeRateOption = Annotated[
    float | None, typer.Option(help="Share of requests probed, 0 to 1 (0 turns probing off) [default: 1].")
]
StoreTextOption = Annotated[
    bool | None, typer.Option("--store-text/--no-store-text", help="Keep prompt and completion text, not only hashes.")
]
ConfigOption = Annotated[
    Path | None, typer.Option(help="TOML file of settings (keys as in the settings reference).")
]
ModeOption = Annotated[str | None, typer.Option(help="observe | shadow | enforce [default: observe].")]
PolicyOption = Annotated[
    Path | None, typer.Option(help="Policy file (from `dynasorctl calibrate --out`) for shadow and enforce.")
]
EnforcePercentOption = Annotated[
    float | None, typer.Option(help="Share of programs enforced in enforce mode, 0-100 [default: 100].")
]


def store(url: str | None, migrate: bool = True, existing: bool = False) -> Engine:
    """The store's engine, migrated; store problems become one-line user errors.

    `existing`: for commands that only read, a missing store is an error, not created.
    """
    try:
        return open_store(url, migrate=migrate, existing=existing)
    except StoreError as exc:
        raise UserError(str(exc)) from exc
