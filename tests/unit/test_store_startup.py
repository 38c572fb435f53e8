"""Start-up on one store: several real processes migrating an empty store at once (exactly
one applies the migrations, the others wait), and clear errors for a store that cannot
be reached (wrong password, unknown database, no server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from proxy.store import db
from tests.servers import free_port

# Each process imports everything first, then waits for the go file, so the upgrades
# really start together (Python's start-up would otherwise spread them over a second).
RACER = """
import json, os, sys, time
from proxy.store import db
url, go, ready = sys.argv[1], sys.argv[2], sys.argv[3]
engine = db.make_engine(url)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
applied = db.upgrade(engine)
print(json.dumps({"applied": applied, "current": db.current(engine)}))
engine.dispose()
"""


def test_processes_starting_at_once_migrate_exactly_once(store_url, tmp_path):
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, store_url, str(go), str(r)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in racers)
        time.sleep(0.02)
    go.touch()
    results = []
    for p in racers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    head = db.heads()[0]
    assert all(r["current"] == head for r in results)
    migrated = [r["applied"] for r in results if r["applied"]]
    assert len(migrated) == 1  # one process applied every migration; the others found none
    assert migrated[0][0] == "0001" and migrated[0][-1] == head


def test_wrong_password_is_one_clear_error(pg_url):
    url = pg_url.replace(":dynasor-test@", ":wrong@")
    with pytest.raises(db.StoreError, match="password authentication failed"):
        db.open_store(url)


def test_unknown_database_is_one_clear_error(postgres):
    with pytest.raises(db.StoreError, match='database "nope" does not exist'):
        db.open_store(postgres.url("nope"))


def test_no_server_is_one_clear_error():
    url = f"postgresql+psycopg://postgres:x@127.0.0.1:{free_port()}/dynasor"
    with pytest.raises(db.StoreError, match="Connection refused"):
        db.open_store(url)


@pytest.mark.parametrize("wrong", ["password", "database"])
def test_a_proxy_pointed_at_a_wrong_store_says_so_in_one_line(postgres, wrong):
    url = (postgres.url("postgres", password="wrong") if wrong == "password"
           else postgres.url("nope"))
    run = subprocess.run([sys.executable, "-m", "dynasorctl", "observe", "--db", url,
                          "--port", str(free_port())], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert ("password authentication failed" if wrong == "password"
            else 'database "nope" does not exist') in lines[0]
    assert "wrong" not in lines[0]  # the password is masked in the URL it names
