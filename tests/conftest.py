"""Shared fixtures: every test's state lives in a temporary directory, and the suite leaves no
process behind."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from tests import procs

SESSION_MARK = "DYNASOR_TEST_SESSION"
RESOURCE_TRACKER = "from multiprocessing.resource_tracker import main"


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Point the default store at a temp dir so no test touches the operator's files."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DYNASOR_DB_URL", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind():
    """Every process the tests start inherits a mark in its environment; at the end of the
    session none may still run (an orphan is found too, whoever its parent is now)."""
    mark = uuid.uuid4().hex
    os.environ[SESSION_MARK] = mark
    yield

    def left_behind() -> list[int]:
        # multiprocessing's resource tracker of this very process ends when it does
        return [pid for pid in procs.marked(SESSION_MARK, mark)
                if not (procs.parent(pid) == os.getpid() and RESOURCE_TRACKER in procs.command(pid))]

    deadline = time.monotonic() + 30  # processes told to stop may take a moment
    while (left := left_behind()) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = [f"{pid}: {procs.command(pid)}" for pid in left]
    for pid in left:
        procs.kill(pid)
    assert not left, "the tests left processes running (killed now):\n" + "\n".join(described)


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
