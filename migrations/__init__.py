"""Alembic migrations of the observation store (applied by `dynasorctl db upgrade` and on start)."""
