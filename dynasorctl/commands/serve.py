"""`dynasorctl serve`: dynasor's own server, its scheduler driving vLLM in this process.

vLLM lives in its own environment (`make engine` builds `.venv-engine`, which
pins torch and the rest): started from another one, `serve` re-executes itself
with that environment's Python, running this checkout's code.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dynasorctl.commands.observe import admin_app, announcer, check_listen, load_settings, serving
from dynasorctl.errors import UserError
from dynasorctl.options import (
    ConfigOption,
    DbOption,
    EnforcePercentOption,
    HostOption,
    ModeOption,
    PolicyOption,
    PortOption,
    ProbeRateOption,
    StoreTextOption,
)
from proxy.logs import configure as configure_logs

ROOT = Path(__file__).resolve().parents[2]  # this checkout
ENGINE_PYTHON = "DYNASOR_ENGINE_PYTHON"  # overrides <checkout>/.venv-engine/bin/python
_REEXEC = "DYNASOR_SERVE_REEXEC"


def engine_python() -> Path:
    return Path(os.environ.get(ENGINE_PYTHON) or ROOT / ".venv-engine" / "bin" / "python")


def ensure_engine_environment() -> None:
    """Return if vLLM imports here; else re-execute `serve` with the engine's Python."""
    if importlib.util.find_spec("vllm") is not None:
        return
    python = engine_python()
    if os.environ.get(_REEXEC):
        raise UserError(f"vLLM does not import in {sys.executable}: run `make engine` again")
    if not python.exists():
        raise UserError(f"vLLM is not installed here and {python} does not exist: run `make engine` "
                        f"(or point ${ENGINE_PYTHON} at a Python with vLLM and dynasor installed)")
    if sys.argv[1:2] != ["serve"]:
        raise UserError("vLLM is not installed here: run `dynasorctl serve` as a program")
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, _REEXEC: "1", "PYTHONPATH": path}  # this checkout's code, not another's
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [str(python), "-m", "dynasorctl", *sys.argv[1:]], env)


class _Signals:
    """SIGINT and SIGTERM interrupt the engine's start-up; once serving, uvicorn handles them.

    uvicorn puts these handlers back when it stops and re-raises the signal that
    stopped it: ignored here, so the engine is shut down and the exit is clean.
    """

    def __init__(self) -> None:
        self.serving = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, frame: Any) -> None:
        if not self.serving:
            raise KeyboardInterrupt


async def _run(settings: Any, engine_args: Any, scheduler: Any, capacity: int | None) -> None:
    from proxy.serve import ServeApp, scheduler_name
    from proxy.upstream.vllm import start_engine

    signals = _Signals()
    try:
        engine = await start_engine(engine_args, scheduler(), capacity)
    except (ValueError, TypeError, OSError) as exc:  # what vLLM raises for a config it refuses
        raise UserError(f"the engine refused to start: {_first_line(exc)}") from exc
    except RuntimeError as exc:  # the engine core died while starting; its log says why
        raise UserError(f"the engine failed to start ({_first_line(exc)}); see its log above") from exc
    try:
        app = ServeApp(settings, engine, scheduler)
        announce = announcer(settings.log_format)
        announce(f"dynasor serving {engine.model_name} on http://{settings.host}:{settings.port} "
                 f"({settings.mode}; scheduler {scheduler_name(engine.admission.scheduler)}, "
                 f"capacity {engine.admission.capacity})")
        signals.serving = True
        await serving(app, settings.host, settings.port, admin_app(app, settings, announce), settings.admin_port,
                      settings.log_format, settings.shutdown_grace_s)
    finally:
        signals.serving = True  # a signal now must not interrupt the engine's shutdown
        engine.shutdown()


def _first_line(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)  # pydantic (vLLM's configs): the first error's own words
    if callable(errors):
        try:
            text = str(errors()[0]["msg"]).removeprefix("Value error, ")
        except (TypeError, LookupError):
            text = str(exc)
    else:
        text = str(exc)
    text = text.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def serve(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="The model: a local checkpoint directory.", show_default=False)],
    host: HostOption = None,
    port: PortOption = None,
    db: DbOption = None,
    probe_rate: ProbeRateOption = None,
    store_text: StoreTextOption = None,
    config: ConfigOption = None,
    mode: ModeOption = None,
    policy: PolicyOption = None,
    enforce_percent: EnforcePercentOption = None,
    scheduler: Annotated[str, typer.Option(
        help="Who orders the engine's work: dynasor (programs: gang, approximate shortest job first, "
        "starvation guard, probes first), program-fifo (gang, in arrival order), fcfs (the engine's "
        "own order), or module:attribute (a Scheduler factory).")] = "dynasor",
    capacity: Annotated[int | None, typer.Option(
        min=1, help="Most requests in the engine at once [default: the engine's max_num_seqs].")] = None,
) -> None:
    """Serve a model on an in-process vLLM engine, dynasor's scheduler deciding the order.

    The proxy's routes and control plane run on top: probes, store, policies, rollout, kill switch, guardrails, admin API, metrics.

    Every other option is vLLM's own (`vllm serve --help`: --max-model-len, --dtype, --served-model-name, ...) and goes to the engine; after `--` if it shares a name with an option here.
    """
    from proxy.core.policy import PolicyFileError, load_policy_file
    from proxy.serve import SchedulerNameError, load_scheduler

    settings = load_settings(config, host=host, port=port, db_url=db, probe_rate=probe_rate,
                             store_text=store_text, mode=mode, policy_file=str(policy) if policy else None,
                             enforce_percent=enforce_percent)
    if not model.exists():
        raise UserError(f"model {model}: no such file or directory (serve takes a local checkpoint)")
    try:
        factory = load_scheduler(scheduler)
        if settings.policy_file:
            load_policy_file(settings.policy_file)  # now, not after the engine's start-up
    except (SchedulerNameError, PolicyFileError) as exc:
        raise UserError(str(exc)) from exc
    check_listen(settings)
    ensure_engine_environment()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint: never wait on the hub
    from proxy.upstream.vllm import EngineOptionError, parse_engine_args

    try:
        engine_args = parse_engine_args(str(model.resolve()), ctx.args)
    except EngineOptionError as exc:
        raise UserError(f"engine options: {exc}") from exc
    configure_logs(settings.log_format)
    import uvloop

    uvloop.run(_run(settings, engine_args, factory, capacity))


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve)
