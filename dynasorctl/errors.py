"""The CLI's one error convention: a one-line message on stderr and a non-zero exit."""

from __future__ import annotations

import typer
from rich.console import Console

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(Exception):
    """A mistake the operator can fix: bad arguments, a missing file, an unreachable store."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` as the command's error and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)
