"""Engine set-up, the default location, and schema upgrades through Alembic.

SQLite (a file, the default) and PostgreSQL (`postgresql+psycopg://`, psycopg 3) behave
alike. Several processes may start on one empty store at once: exactly one migrates and
the others wait for it (on PostgreSQL an advisory lock held by the migrating transaction,
see migrations/env.py; on SQLite a lock file beside the database).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
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


# PostgreSQL: a server that went away must fail a write in seconds (libpq would wait for
# the operating system's TCP timeout), and a connection the pool kept from before a
# restart is checked before use instead of failing the next batch.
POSTGRES_CONNECT_TIMEOUT_S = 5


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).expanduser()


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get their directory created and WAL mode."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r}") from exc
    if (path := _sqlite_file(parsed)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    options: dict = {}
    if parsed.get_backend_name() == "postgresql":
        options = {"pool_pre_ping": True,
                   "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}}
    try:
        engine = create_engine(parsed, **options)
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


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """On a SQLite file, one migrating process at a time (PostgreSQL locks in env.py).

    A lock file beside the database, not the database itself: closing any descriptor of
    the database file would drop SQLite's own POSIX locks held by this process.
    """
    path = _sqlite_file(engine.url)
    if path is None:
        yield
        return
    with open(path.with_name(path.name + ".migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the process migrating now
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> list[str]:
    """Bring the schema to `revision` (the newest by default); the revisions applied here.

    Safe when several processes start at once: one applies the migrations, the others wait
    for it and then find nothing to apply.
    """
    from alembic import command

    cfg = _alembic_config(engine)
    applied: list[str] = []
    cfg.attributes["applied"] = applied
    try:
        with _migration_lock(engine):
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {engine.url.render_as_string()}: {_reason(exc)}") from exc
    return applied


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    try:
        with _migration_lock(engine):
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
    try:  # a server that refuses us is named as such, not as a failed migration
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open {engine.url.render_as_string()}: {_reason(exc)}") from exc
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
    """The driver's message on one line (libpq's spans several)."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return str(exc).splitlines()[0]
    return " ".join(line.strip() for line in str(orig).splitlines() if line.strip())
