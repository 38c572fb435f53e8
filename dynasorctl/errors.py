"""The CLI's one error convention: a one-line message on stderr and a non-zero exit."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(Exception):
    """A mistake the operator can fix: bad arguments, a missing file, an unreachable store."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` as the command's error and return the Exit to raise.

    The message is plain text: what it quotes (a scope `model:[/x]`, a path, a value)
    is shown as typed, never read as rich markup.
    """
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))
    return typer.Exit(code)
