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
