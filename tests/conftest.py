"""Shared fixtures: every test's state lives in a temporary directory."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Point the default store at a temp dir so no test touches the operator's files."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DYNASOR_DB_URL", raising=False)


@pytest.fixture(autouse=True)
def _engines_disposed(monkeypatch):
    """Every store engine a test opens is disposed at its end: a PostgreSQL connection left
    to the garbage collector warns (an error under our settings)."""
    from proxy.store import db

    made = []
    real = db.create_engine

    def tracked(*args, **kwargs):
        engine = real(*args, **kwargs)
        made.append(engine)
        return engine

    monkeypatch.setattr(db, "create_engine", tracked)
    yield
    for engine in made:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (see tests/postgres.py); stopped at the end."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres):
    """A new, empty PostgreSQL database, dropped at the end."""
    url = postgres.database()
    yield url
    postgres.drop(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """An empty store on each back end: a SQLite file, and a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    yield request.getfixturevalue("pg_url")
