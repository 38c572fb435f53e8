"""Options shared by several commands, declared once."""

from __future__ import annotations

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


def store(url: str | None, migrate: bool = True, existing: bool = False) -> Engine:
    """The store's engine, migrated; store problems become one-line user errors.

    `existing`: for commands that only read, a missing store is an error, not created.
    """
    try:
        return open_store(url, migrate=migrate, existing=existing)
    except StoreError as exc:
        raise UserError(str(exc)) from exc
