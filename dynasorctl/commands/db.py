"""`dynasorctl db`: schema migrations of the store."""

from __future__ import annotations

import typer
from rich import print as rprint

from dynasorctl.errors import UserError
from dynasorctl.options import DbOption, store
from proxy.store import db as storedb

db_app = typer.Typer(help="Store schema: upgrade, current revision.", no_args_is_help=True)


@db_app.command()
def upgrade(db: DbOption = None) -> None:
    """Apply every pending migration (several processes at once: one applies, the others wait)."""
    engine = store(db, migrate=False)
    try:
        applied = storedb.upgrade(engine)
        rev = storedb.current(engine)
    except storedb.StoreError as exc:
        raise UserError(str(exc)) from exc
    done = f"applied {', '.join(applied)}" if applied else "nothing to apply"
    rprint(f"store {engine.url.render_as_string()} at revision {rev} ({done})")


@db_app.command()
def current(db: DbOption = None) -> None:
    """Print the store's schema revision and the newest one known."""
    engine = store(db, migrate=False, existing=True)
    try:
        rev = storedb.current(engine)
    except storedb.StoreError as exc:
        raise UserError(str(exc)) from exc
    head = ", ".join(storedb.heads())
    state = "up to date" if rev in storedb.heads() else "needs `dynasorctl db upgrade`"
    rprint(f"revision {rev or '(empty store)'}; newest {head}: {state}")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
