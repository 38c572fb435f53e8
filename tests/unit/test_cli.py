"""The CLI's user-facing contract: clear one-line errors, non-zero exits, no tracebacks."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dynasorctl.cli import app
from proxy.store.db import open_store
from proxy.store.recorder import write_records
from tests.unit.test_store import _record

runner = CliRunner()


def run(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "dynasorctl", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["observe", "--upstream", "ftp://x"], "invalid setting upstream_url"),
        (["observe", "--probe-rate", "2"], "invalid setting probe_rate"),
        (["requests", "show", "nope"], "no store at"),
        (["requests", "list", "--db", "::nope::"], "not a database URL"),
        (["observe", "--config", "/no/such.toml"], "cannot read config"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_flag_is_a_usage_error():
    result = run("requests", "list", "--limit", "zero")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_broken_database_file(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    result = run("requests", "list", "--db", f"sqlite:///{bad}")
    assert result.returncode == 2
    assert "file is not a database" in result.stderr
    assert bad.read_bytes() == b"garbage" * 1000  # nothing touched


def test_observe_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run("observe", "--port", str(port), "--db", f"sqlite:///{tmp_path}/x.db")
    assert result.returncode == 2 and "cannot listen" in result.stderr


def test_requests_list_and_show(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    write_records(open_store(url), [_record("abc123"), _record("abd456")])
    result = runner.invoke(app, ["requests", "list", "--db", url, "--format", "json"])
    assert result.exit_code == 0
    assert {r["id"] for r in json.loads(result.stdout)} == {"abc123", "abd456"}
    shown = runner.invoke(app, ["requests", "show", "abc", "--db", url, "--format", "json"])
    assert shown.exit_code == 0
    data = json.loads(shown.stdout)
    assert data["id"] == "abc123" and data["probes"][0]["answer"] == "5"
    table = runner.invoke(app, ["requests", "show", "abc1", "--db", url])
    assert table.exit_code == 0 and "probes" in table.stdout
    ambiguous = run("requests", "show", "ab", "--db", url)
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr


def test_db_upgrade_and_current(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    before = run("db", "current", "--db", url)
    assert before.returncode == 2 and "no store at" in before.stderr
    assert runner.invoke(app, ["db", "upgrade", "--db", url]).exit_code == 0
    after = runner.invoke(app, ["db", "current", "--db", url])
    assert "up to date" in after.stdout


def test_every_command_has_help():
    for args in (["--help"], ["observe", "--help"], ["requests", "--help"], ["db", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, args


READ_ONLY = [["requests", "list"], ["requests", "show", "ab"], ["db", "current"], ["rollout", "status"],
             ["rollout", "history"], ["labels", "list"], ["calibrate"]]


@pytest.mark.parametrize("args", READ_ONLY, ids=[" ".join(a) for a in READ_ONLY])
def test_reading_a_store_that_is_not_there_says_so_and_creates_nothing(tmp_path, args):
    path = tmp_path / "nowhere" / "dynasor.db"
    result = run(*args, "--db", f"sqlite:///{path}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: no store at {path}") and result.stderr.count("\n") == 1
    assert not path.exists() and not path.parent.exists()


def test_a_database_without_our_tables_is_no_store(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    result = run("requests", "list", "--db", f"sqlite:///{path}")
    assert result.returncode == 2 and "holds no dynasor tables" in result.stderr


def test_error_messages_are_shown_as_typed_not_as_markup(tmp_path):
    """`[/x]` once crashed the error printer, and text in brackets vanished."""
    url = f"sqlite:///{tmp_path}/s.db"
    open_store(url)
    result = run("rollout", "set", "--scope", "model:[/x]", "--mode", "enforce", "--reason", "r",
                 "--db", url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: scope 'model:[/x]': enforce needs a policy")
    bold = run("requests", "show", "[bold]x[/bold]", "--db", url)
    assert "no recorded request with id '[bold]x[/bold]'" in bold.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [({"DYNASOR_GUARDRAILS": "notjson"}, ("error: invalid setting guardrails (from DYNASOR_GUARDRAILS): "
                                          "not valid JSON (Expecting value: line 1 column 1 (char 0))")),
     ({"DYNASOR_PORT": "abc"}, "error: invalid setting port (from DYNASOR_PORT): Input should be a valid integer"),
     ({"DYNASOR_GUARDRAILS": '{"window": "x"}'}, "error: invalid setting guardrails.window (from DYNASOR_GUARDRAILS)")],
)
def test_a_bad_environment_setting_is_one_line(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run("observe")
    assert result.returncode == 2 and result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1


def test_a_bad_toml_file_is_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("port = \n")
    result = run("observe", "--config", str(config))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {config} is not valid TOML: Invalid value (at line 1")
