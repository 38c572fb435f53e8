"""`dynasorctl replay`: serve recorded traces as an OpenAI-compatible upstream."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dynasorctl import traces
from dynasorctl.errors import UserError
from dynasorctl.replay import base_url, bind_socket, create_replay_app, replay_server
from dynasorctl.trials import load_trials

console = Console(stderr=True, highlight=False, soft_wrap=True)


def replay(
    traces_file: Annotated[
        Path,
        typer.Option("--traces", help="Trace file (.jsonl or .jsonl.gz): chain-of-thought or "
                     "self-consistency.", show_default="the packaged sample"),
    ] = traces.PACKAGED_SAMPLE,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).",
                                      min=0, max=65535)] = 8001,
    tokens_per_second: Annotated[
        float,
        typer.Option(help="Streaming rate of each choice; 0 streams as fast as possible.",
                     min=0.0),
    ] = 0.0,
    trials_files: Annotated[
        list[Path] | None,
        typer.Option("--trials", help="Trials recorded for the traces (repeatable; joined by "
                     "trace_id): trials are answered from them, with logprobs."),
    ] = None,
) -> None:
    """Answer /v1/chat/completions and /v1/completions from recorded traces, probes and trials
    included."""
    try:
        records = traces.load(traces_file)
        trials = load_trials(trials_files) if trials_files else None
    except traces.TraceFileError as exc:
        raise UserError(str(exc)) from None
    if trials is not None:
        ids = {getattr(r, "trace_id", None) for r in records}
        if not ids & trials.by_trace.keys():
            raise UserError(f"none of the traces of {traces_file} has trials in "
                            f"{', '.join(map(str, trials_files or ()))}")
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    app = create_replay_app(records, tokens_per_second, trials)
    with_trials = f", trials of {len(trials.by_trace)} traces" if trials is not None else ""
    console.print(
        f"replaying {len(records)} records ({len(app.index.problems)} problems, "
        f"models: {', '.join(app.index.models)}{with_trials}) at {base_url(sock)}/v1 — Ctrl-C stops"
    )
    replay_server(app, sock).run(sockets=[sock])


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
