"""The `dynasorctl` command line: one Typer app; each command group lives in `commands/`."""

from __future__ import annotations

import importlib

import typer

from dynasorctl.errors import UserError, fail
from proxy import lifetime

app = typer.Typer(
    name="dynasorctl",
    help="Dynasor: certaindex-guided early stopping for reasoning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module exposes `register(app)`; the order here is the order in --help.
COMMAND_MODULES = ("observe", "serve", "replay", "demo", "requests", "db", "export", "calibrate", "labels",
                   "rollout", "dashboard", "bench", "bench_scale")

for _name in COMMAND_MODULES:
    importlib.import_module(f"dynasorctl.commands.{_name}").register(app)


def main() -> None:
    """Console entry point: domain errors become one-line messages, never tracebacks.

    Click's standalone mode already turns usage errors into a message and exit 2.
    """
    lifetime.from_env()  # started by another dynasorctl that it must not outlive
    try:
        app()
    except UserError as exc:
        raise SystemExit(fail(str(exc)).exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
