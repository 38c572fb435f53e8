"""`dynasorctl rollout`: each command against a store, and bad input refused with one line,
exit 2 and the state as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine
from typer.testing import CliRunner

from dynasorctl.commands.rollout import register
from dynasorctl.errors import UserError
from proxy.control import rollout
from proxy.store import db
from tests.unit.test_rollout import add_policy, snapshot

runner = CliRunner()


def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


def invoke(*args: str) -> tuple[int, str]:
    """Run a command as `dynasorctl` does: a UserError is its one-line message and exit 2."""
    result = runner.invoke(app(), ["rollout", *args], env={"COLUMNS": "200"})
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture()
def store(tmp_path: Path) -> tuple[str, Engine]:
    url = f"sqlite:///{tmp_path}/s.db"
    return url, db.open_store(url)


@pytest.fixture(autouse=True)
def _operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "alice")


def test_status_of_an_empty_store_says_proxies_follow_their_flags(store) -> None:
    url, _ = store
    code, out = invoke("status", "--db", url)
    assert code == 0 and "no rollout in the store" in out and "flags" in out
    code, out = invoke("status", "--db", url, "--format", "json")
    assert code == 0 and json.loads(out) == {"version": 0, "scopes": [], "history": []}


def test_set_then_status_shows_scopes_policy_and_last_changes(store) -> None:
    url, engine = store
    pid = add_policy(engine, model="m")
    code, out = invoke("set", "--db", url, "--scope", "model:m", "--mode", "enforce",
                       "--percent", "5", "--policy", "latest", "--reason", "first 5%")
    assert code == 0
    assert f"scope 'model:m': enforce 5% (the rest shadow), policy {pid} (model 'm', version 1)" in out
    invoke("set", "--db", url, "--mode", "observe", "--reason", "watch the rest")

    code, out = invoke("status", "--db", url)
    assert code == 0
    for text in ("model:m", "enforce 5%", f"{pid} (model 'm', version 1)", "first 5%", "alice",
                 "Last 5 changes", "mode: (new) → observe"):
        assert text in out
    code, out = invoke("status", "--db", url, "--format", "json")
    data = json.loads(out)
    assert [s["scope"] for s in data["scopes"]] == ["model:m", "*"]  # in order of precedence
    assert data["scopes"][0] | {"updated_at": None} == {
        "scope": "model:m", "mode": "enforce", "percent": 5.0, "policy_id": pid,
        "policy_version": 1, "policy_model": "m", "updated_at": None, "updated_by": "alice",
        "reason": "first 5%"}
    assert len(data["history"]) == 5 and data["history"][0]["reason"] == "watch the rest"
    assert data["version"] == rollout.load_state(engine).version


def test_set_changes_only_what_is_given(store) -> None:
    url, engine = store
    pid = add_policy(engine)
    invoke("set", "--db", url, "--mode", "shadow", "--policy", str(pid), "--reason", "r")
    code, out = invoke("set", "--db", url, "--percent", "25", "--reason", "later")
    assert code == 0 and "shadow" in out
    s = rollout.load_state(engine).scopes["*"]
    assert (s.mode, s.percent, s.policy_id) == ("shadow", 25.0, pid)


def test_enforce_at_0_percent_gets_a_note(store) -> None:
    url, engine = store
    add_policy(engine)
    code, out = invoke("set", "--db", url, "--mode", "enforce", "--policy", "latest",
                       "--reason", "r")
    assert code == 0 and "enforce at 0% enforces no request" in out


def test_promote_steps_up_and_stops_at_100(store) -> None:
    url, engine = store
    add_policy(engine)
    invoke("set", "--db", url, "--mode", "shadow", "--policy", "latest", "--reason", "r")
    outs = [invoke("promote", "--db", url, "--reason", f"step {i}") for i in range(6)]
    assert all(code == 0 for code, _ in outs)
    assert [out.splitlines()[0].split(": ")[1].split(",")[0] for _, out in outs] == [
        f"enforce {p}% (the rest shadow)" for p in (1, 5, 10, 25, 50, 100)]
    before = snapshot(engine)
    assert invoke("promote", "--db", url, "--reason", "more") == (
        2, "scope '*' is already at 100%")
    assert snapshot(engine) == before


def test_kill_says_how_many_scopes_went_back_to_observe(store) -> None:
    url, engine = store
    pid = add_policy(engine)
    for scope, mode in (("*", "enforce"), ("model:a", "shadow"), ("key:k", "observe")):
        rollout.set_scope(engine, scope, mode=mode, policy=pid, reason="r", who="bob")
    code, out = invoke("kill", "--db", url, "--reason", "bad answers")
    assert code == 0
    assert "2 scopes put back to observe (*, model:a)" in out
    assert {s.mode for s in rollout.load_state(engine).scopes.values()} == {"observe"}
    assert rollout.history(engine, 1)[0].who == "alice"
    code, out = invoke("kill", "--db", url, "--reason", "again")
    assert code == 0 and "0 scopes put back to observe;" in out


def test_kill_on_an_empty_store_overrides_flags(store) -> None:
    url, engine = store
    code, out = invoke("kill", "--db", url, "--reason", "stop")
    assert code == 0 and "1 scope put back to observe (*)" in out
    assert rollout.load_state(engine).scopes["*"].mode == "observe"


def test_history_table_json_limit_and_scope(store) -> None:
    url, engine = store
    code, out = invoke("history", "--db", url)
    assert code == 0 and "no rollout changes yet" in out
    for i in range(3):
        rollout.set_scope(engine, "model:a" if i == 1 else "*", percent=i * 10, reason=f"c{i}",
                          who="bob")
    code, out = invoke("history", "--db", url)
    assert code == 0 and "5 most recent changes" in out and "percent: 0 → 20" in out
    code, out = invoke("history", "--db", url, "--limit", "2", "--format", "json")
    data = json.loads(out)
    assert [(e["scope"], e["field"], e["previous"], e["new"], e["reason"], e["who"])
            for e in data] == [("*", "percent", "0", "20", "c2", "bob"),
                               ("model:a", "percent", None, "10", "c1", "bob")]
    code, out = invoke("history", "--db", url, "--scope", "model:a", "--format", "json")
    assert {e["scope"] for e in json.loads(out)} == {"model:a"}


@pytest.mark.parametrize(("args", "message"), [
    (["set", "--mode", "fast", "--reason", "r"], "unknown mode 'fast'"),
    (["set", "--mode", "enforce", "--percent", "150", "--reason", "r"],
     "percent must be from 0 to 100, not 150"),
    (["set", "--mode", "enforce", "--scope", "model:new", "--reason", "r"],
     "enforce needs a policy"),
    (["set", "--mode", "shadow", "--scope", "key:k", "--reason", "r"],
     "shadow needs a policy"),
    (["set", "--policy", "999", "--reason", "r"], "no policy 999 in the store"),
    (["set", "--policy", "newest", "--reason", "r"], 'policy id, "latest" or "latest-sc"'),
    (["set", "--mode", "observe", "--scope", "everything", "--reason", "r"], "scope must be"),
    (["set", "--mode", "enforce", "--percent", "5"], "--reason is required"),
    (["set", "--mode", "enforce", "--reason", "   "], "--reason is required"),
    (["set", "--reason", "r"], "nothing to change"),
    (["promote"], "--reason is required"),
    (["promote", "--scope", "model:new", "--reason", "r"], "enforce needs a policy"),
    (["kill"], "--reason is required"),
    (["history", "--scope", "nope"], "scope must be"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(store, args: list[str],
                                                          message: str) -> None:
    url, engine = store
    pid = add_policy(engine)
    rollout.set_scope(engine, "*", mode="shadow", policy=pid, reason="r", who="bob")
    before = snapshot(engine)
    code, out = invoke(*args, "--db", url)
    assert code == 2
    assert message in out and "\n" not in out.strip()
    assert snapshot(engine) == before


@pytest.mark.parametrize("args", [["set", "--percent", "lots", "--reason", "r"],
                                  ["history", "--limit", "0"], ["set", "--nope"]])
def test_malformed_flags_are_usage_errors(store, args: list[str]) -> None:
    url, _ = store
    result = runner.invoke(app(), ["rollout", *args, "--db", url])
    assert result.exit_code == 2 and not isinstance(result.exception, UserError)
    assert "Traceback" not in result.output


def test_a_broken_store_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    code, out = invoke("kill", "--reason", "r", "--db", f"sqlite:///{bad}")
    assert code == 2 and "file is not a database" in out and "\n" not in out


_ENTRY = ("import sys, dynasorctl.cli as c\n"
          "from dynasorctl.commands import rollout\n"
          "if 'rollout' not in c.COMMAND_MODULES: rollout.register(c.app)\n"
          "sys.argv[0] = 'dynasorctl'\n"
          "c.main()\n")


def test_the_real_entry_point_prints_one_line_and_exits_2(store) -> None:
    url, engine = store
    before = snapshot(engine)
    for args, message in ((["set", "--mode", "enforce", "--percent", "150", "--reason", "r"],
                           "error: percent must be from 0 to 100, not 150"),
                          (["kill"], "error: --reason is required")):
        done = subprocess.run([sys.executable, "-c", _ENTRY, "rollout", *args, "--db", url],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2
        assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
        assert "Traceback" not in done.stderr + done.stdout
    assert snapshot(engine) == before
