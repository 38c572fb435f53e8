"""Running `dynasorctl` commands in process, as `cli.main` runs them, for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from dynasorctl.commands import calibrate, labels
from dynasorctl.errors import UserError

runner = CliRunner()
GRADING = ("calibrate", "evaluate")  # commands that grade answers: their cache and workers


def app() -> typer.Typer:
    a = typer.Typer()
    calibrate.register(a)
    labels.register(a)
    return a


def invoke(args: list[str], cache: Path | None = None) -> tuple[int, str, Exception | None]:
    """Run as `cli.main` does: a UserError is the command's one-line error (exit 2)."""
    if cache is not None and args[0] in GRADING:
        args = [*args, "--cache-dir", str(cache), "--workers", "1"]
    result = runner.invoke(app(), args, standalone_mode=False)
    if isinstance(result.exception, UserError):
        return 2, result.output, result.exception
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output, None


def user_error(args: list[str], cache: Path | None = None) -> str:
    """The one-line message of a command that must fail on a user mistake."""
    code, _, exc = invoke(args, cache)
    assert code == 2 and exc is not None
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    return message
