"""Engine set-up, the default location, and schema upgrades through Alembic."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).parent


class StoreError(Exception):
    """The store cannot be opened or migrated; the message says why."""


def default_url() -> str:
    """`DYNASOR_DB_URL`, else SQLite at `$XDG_DATA_HOME/dynasor/dynasor.db` (~/.local/share)."""
    if url := os.environ.get("DYNASOR_DB_URL"):
        return url
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'dynasor' / 'dynasor.db'}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
    cur = dbapi_conn.cursor()
    # WAL lets the dashboard and CLI read while the proxy writes; busy_timeout
    # rides out short lock contention between several proxy processes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get their directory created and WAL mode."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r}") from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise StoreError(f"cannot open {parsed.render_as_string()}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default)."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {engine.url.render_as_string()}: {_reason(exc)}") from exc


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    try:
        command.downgrade(_alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {engine.url.render_as_string()}: {_reason(exc)}") from exc


def current(engine: Engine) -> str | None:
    """The schema revision the store is at (None for an empty store)."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read {engine.url.render_as_string()}: {_reason(exc)}") from exc


def heads() -> list[str]:
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(None)  # type: ignore[arg-type]
    return list(ScriptDirectory.from_config(cfg).get_heads())


def has_schema(engine: Engine) -> bool:
    try:
        return inspect(engine).has_table("requests")
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read {engine.url.render_as_string()}: {_reason(exc)}") from exc


def check_writable(engine: Engine) -> None:
    """Raise unless the store takes a write now (a no-op update, rolled back; blocking)."""
    with engine.connect() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
        conn.rollback()


def open_store(url: str | None = None, migrate: bool = True, existing: bool = False) -> Engine:
    """The engine for `url` (default location otherwise), migrated to the newest schema.

    With `existing`, a store that does not exist yet is a StoreError instead of being
    created (commands that only read must not leave an empty store behind).
    """
    url = url or default_url()
    if existing:
        must_exist(url)
    engine = make_engine(url)
    if existing and not has_schema(engine):
        raise StoreError(f"no store at {engine.url.render_as_string()}: the database holds no "
                         "dynasor tables (start `dynasorctl observe` on it, or point --db elsewhere)")
    if migrate:
        upgrade(engine)
    return engine


def must_exist(url: str) -> None:
    """StoreError when `url` names an SQLite file that is not there (other databases: see
    `open_store(existing=True)`)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r}") from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).expanduser()
        if not path.exists():
            raise StoreError(f"no store at {path}: nothing has been recorded there (start "
                             "`dynasorctl observe`, or point --db or DYNASOR_DB_URL at a store)")


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig) if orig is not None else str(exc).splitlines()[0]
