"""`dynasorctl observe`: run the transparent, measuring proxy in front of an upstream."""

from __future__ import annotations

import logging
import os
import re
import socket
import tomllib
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from dynasorctl.errors import UserError, err_console
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
    store,
)
from proxy.logs import configure as configure_logs
from proxy.settings import Settings


class LogFormatChoice(str, Enum):
    text = "text"
    json = "json"


def load_settings(config: Path | None, **overrides: Any) -> Settings:
    """Settings from env, then the TOML file, then flags; errors name the bad field."""
    values: dict[str, Any] = {}
    if config is not None:
        try:
            values = tomllib.loads(config.read_text())
        except OSError as exc:
            raise UserError(f"cannot read config {config}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{config} is not valid TOML: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise UserError(f"invalid setting {field}{_from_env(field, values)}: {first['msg']}") from exc
    except SettingsError as exc:  # an environment value that is not the JSON its field needs
        found = re.search(r'field "([^"]+)"', str(exc))
        field = found[1] if found else "settings"
        why = str(exc.__cause__).splitlines()[0] if exc.__cause__ else "cannot be read"
        raise UserError(f"invalid setting {field}{_from_env(field, values)}: "
                        f"not valid JSON ({why})") from exc


def _from_env(field: str, given: dict[str, Any]) -> str:
    """Where a bad value came from, when it was the environment (flags and files say so)."""
    name = f"DYNASOR_{field.split('.')[0].upper()}"
    return f" (from {name})" if field.split(".")[0] not in given and name in os.environ else ""


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _config(app: Any, host: str, port: int, lifespan: str = "on", log_format: str = "text",
            grace_s: float | None = None) -> Any:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    # No Server or Date header of its own: the client gets the upstream's. In JSON,
    # uvicorn's own lines go through the root logger's JSON handler, not its text one.
    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools",
                          log_level="warning", access_log=False, lifespan=lifespan,
                          server_header=False, date_header=False, timeout_graceful_shutdown=grace_s,
                          log_config=None if log_format == "json" else LOGGING_CONFIG)


def _server(config: Any) -> Any:
    import uvicorn

    class ProxyServer(uvicorn.Server):
        """uvicorn, but a second SIGINT/SIGTERM ends in-flight requests now instead of
        skipping the application's shutdown: they are still ended, recorded and flushed."""

        _loop: Any = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                super().handle_exit(sig, frame)
                return
            self._captured_signals.append(sig)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._end_now)

        async def serve(self, sockets: Any = None) -> None:
            import asyncio

            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def _end_now(self) -> None:
            tasks = list(self.server_state.tasks)
            if tasks:
                logging.getLogger("dynasor").warning(
                    "second signal: ending %d in-flight requests now", len(tasks))
            for task in tasks:
                task.cancel()

    return ProxyServer(config)


async def serving(app: Any, host: str, port: int, admin: Any = None, admin_port: int = 0,
                  log_format: str = "text", grace_s: float | None = None) -> None:
    """Serve the proxy (and the admin API on loopback) until SIGINT/SIGTERM; shutdown flushes.

    In-flight requests get `grace_s` to finish; then they are ended and recorded as
    interrupted. A second signal ends them at once; the records are flushed either way.
    """
    import asyncio

    import uvicorn

    main = _server(_config(app, host, port, log_format=log_format, grace_s=grace_s))
    if admin is None:
        await main.serve()
        return
    # The admin API shares the proxy's lifespan: it stops when the proxy stops.
    side = uvicorn.Server(_config(admin, "127.0.0.1", admin_port, lifespan="off",
                                  log_format=log_format))
    side_task = asyncio.create_task(side.serve())
    await main.serve()
    side.should_exit = True
    await side_task


def serve(app: Any, host: str, port: int, admin: Any = None, admin_port: int = 0,
          log_format: str = "text", grace_s: float | None = None) -> None:
    import uvloop

    uvloop.run(serving(app, host, port, admin, admin_port, log_format, grace_s))


def check_listen(settings: Settings) -> None:
    """The store opens and the ports are free: checked now, with clear messages, not in the server."""
    store(settings.db_url)
    check_port_free(settings.host, settings.port)
    if settings.admin_token:
        check_port_free("127.0.0.1", settings.admin_port)


def admin_app(app: Any, settings: Settings, announce: Callable[[str], None]) -> Any:
    """The admin API of `app`, when an admin token is set."""
    if not settings.admin_token:
        return None
    from proxy.control.admin import AdminApp

    announce(f"admin API on http://127.0.0.1:{settings.admin_port} (token required)")
    return AdminApp(app, settings.admin_token)


def observe(
    upstream: Annotated[str | None, typer.Option(help="Base URL of the vLLM or SGLang server.")] = None,
    host: HostOption = None,
    port: PortOption = None,
    db: DbOption = None,
    probe_rate: ProbeRateOption = None,
    store_text: StoreTextOption = None,
    config: ConfigOption = None,
    mode: ModeOption = None,
    policy: PolicyOption = None,
    enforce_percent: EnforcePercentOption = None,
    log_format: Annotated[
        LogFormatChoice | None, typer.Option(help="Log lines: text, or json (one object a line) [default: text].")
    ] = None,
    otlp_endpoint: Annotated[
        str | None, typer.Option(help="Send a trace of every observed request to this OTLP/HTTP collector "
                                 "(e.g. http://127.0.0.1:4318; needs the otel extra) [default: off].")
    ] = None,
    affinity_header: Annotated[
        str | None, typer.Option(help="Header a router in front of several replicas pins a session by "
                                 "(vllm-router: X-Session-ID; sglang-router: X-SMG-Routing-Key).")
    ] = None,
) -> None:
    """Run the proxy: relay every request, probe and record out of band; shadow or enforce a policy."""
    settings = load_settings(config, upstream_url=upstream, host=host, port=port, db_url=db,
                             probe_rate=probe_rate, store_text=store_text, mode=mode,
                             policy_file=str(policy) if policy else None, enforce_percent=enforce_percent,
                             log_format=log_format.value if log_format else None, otlp_endpoint=otlp_endpoint,
                             affinity_header=affinity_header)
    check_listen(settings)
    configure_logs(settings.log_format)
    from proxy.core.policy import PolicyFileError
    from proxy.pipeline.app import create_app
    from proxy.tracing import TracingUnavailable

    try:
        app = create_app(settings)
    except (PolicyFileError, TracingUnavailable) as exc:
        raise UserError(str(exc)) from exc
    what = {"observe": "observing", "shadow": "shadowing", "enforce": "enforcing"}[settings.mode]
    announce = announcer(settings.log_format)
    announce(
        f"dynasor {what} {settings.upstream.shown} on http://{settings.host}:{settings.port} "
        f"(probe rate {settings.probe_rate:g}, every {settings.probe_interval} tokens"
        + (f"; policy {settings.policy_file}" if settings.policy_file else "")
        + (f", {settings.enforce_percent:g}% enforced" if settings.mode == "enforce" else "") + ")"
        + (f"; traces to {settings.otlp_endpoint}" if settings.otlp_endpoint else "")
    )
    if settings.upstream.notice:
        announce(f"note: {settings.upstream.notice}")
    serve(app, settings.host, settings.port, admin_app(app, settings, announce), settings.admin_port,
          settings.log_format, settings.shutdown_grace_s)


def announcer(log_format: str) -> Callable[[str], None]:
    """Start-up lines: for people on the console, or as log events where logs are JSON."""
    if log_format == "json":
        return logging.getLogger("dynasor").info
    return lambda line: err_console.print(line, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(observe)
