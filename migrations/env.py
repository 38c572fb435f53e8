"""Alembic environment: the engine comes from the caller (proxy.store.db.upgrade)."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine, text

from proxy.store.models import Base

# PostgreSQL: the transaction that migrates holds this advisory lock, so processes starting
# at once on one database migrate one at a time; the others then find nothing to do.
MIGRATION_LOCK = 0x64796E61736F72  # "dynasor"

config = context.config
applied = config.attributes.get("applied")  # proxy.store.db.upgrade reports these


def _applied(*, step: Any, **_kw: Any) -> None:  # Alembic's on_version_apply
    if applied is not None:
        applied.extend(step.up_revision_ids if step.is_upgrade else step.down_revision_ids)


engine = config.attributes.get("engine")
if engine is None:  # plain `alembic` command line: take the URL from alembic.ini
    engine = create_engine(config.get_main_option("sqlalchemy.url"))

sqlite = engine.dialect.name == "sqlite"
with engine.connect() as connection:
    if sqlite:
        # Batch migrations rebuild a table (copy, drop, rename). With foreign keys
        # enforced, dropping the old `requests` would cascade and delete every probe
        # and sample. The pragma only takes effect outside a transaction.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
        on_version_apply=_applied,
    )
    with context.begin_transaction():
        if engine.dialect.name == "postgresql":
            # Taken before Alembic reads the current revision; released at commit.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
    connection.commit()
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
