"""`dynasorctl dashboard`: live traffic, requests and their probes, rollout with promote/kill."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynasorctl.errors import UserError
from dynasorctl.options import DbOption
from proxy.store.db import StoreError, default_url, make_engine, must_exist


def dashboard(
    db: DbOption = None,
    proxy: Annotated[str | None, typer.Option(
        "--proxy", help="Base URL of a running proxy; its /health is shown (timeout 1 s).",
        show_default=False)] = None,
    parquet: Annotated[Path | None, typer.Option(
        "--parquet", help="A Parquet export (`dynasorctl export`): the savings replay reads "
        "its newest runs instead of the live store.", show_default=False)] = None,
) -> None:
    """A terminal dashboard: traffic, requests, probe timelines, rollout (p promote, k kill)."""
    from dynasorctl.dashboard.app import create_app
    from dynasorctl.dashboard.source import StoreSource

    try:
        # No migration: the dashboard reads what is there; a store it cannot read shows
        # in its banner rather than stopping it.
        url = db or default_url()
        must_exist(url)  # reading a store that is not there must not create an empty one
        engine = make_engine(url)
    except StoreError as exc:
        raise UserError(str(exc)) from exc
    create_app(StoreSource(engine, parquet=parquet), proxy_url=proxy).run()


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
