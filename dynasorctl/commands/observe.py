"""`dynasorctl observe`: run the transparent, measuring proxy in front of an upstream."""

from __future__ import annotations

import logging
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from dynasorctl.errors import UserError, err_console
from dynasorctl.options import DbOption, store
from proxy.settings import Settings


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
        raise UserError(f"invalid setting {field}: {first['msg']}") from exc


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _config(app: Any, host: str, port: int, lifespan: str = "on") -> Any:
    import uvicorn

    # No Server or Date header of its own: the client gets the upstream's.
    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools",
                          log_level="warning", access_log=False, lifespan=lifespan,
                          server_header=False, date_header=False)


def serve(app: Any, host: str, port: int, admin: Any = None, admin_port: int = 0) -> None:
    """Serve the proxy (and the admin API on loopback) until SIGINT/SIGTERM; shutdown flushes."""
    import asyncio

    import uvicorn
    import uvloop

    main = uvicorn.Server(_config(app, host, port))
    if admin is None:
        main.run()
        return
    # The admin API shares the proxy's lifespan: it stops when the proxy stops.
    side = uvicorn.Server(_config(admin, "127.0.0.1", admin_port, lifespan="off"))

    async def both() -> None:
        side_task = asyncio.create_task(side.serve())
        await main.serve()
        side.should_exit = True
        await side_task

    uvloop.run(both())


def observe(
    upstream: Annotated[str | None, typer.Option(help="Base URL of the vLLM or SGLang server.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8080].")] = None,
    db: DbOption = None,
    probe_rate: Annotated[
        float | None, typer.Option(help="Share of requests probed, 0 to 1 (0 turns probing off) [default: 1].")
    ] = None,
    store_text: Annotated[
        bool | None, typer.Option("--store-text/--no-store-text", help="Keep prompt and completion text, not only hashes.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file of settings (keys as in the README's table).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="observe | shadow | enforce [default: observe].")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Policy file (from `dynasorctl calibrate --out`) for shadow and enforce.")
    ] = None,
    enforce_percent: Annotated[
        float | None, typer.Option(help="Share of programs enforced in enforce mode, 0-100 [default: 100].")
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
                             affinity_header=affinity_header)
    store(settings.db_url)  # fail now, with a clear message, not inside the server
    check_port_free(settings.host, settings.port)
    if settings.admin_token:
        check_port_free("127.0.0.1", settings.admin_port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from proxy.core.policy import PolicyFileError
    from proxy.pipeline.app import create_app

    try:
        app = create_app(settings)
    except PolicyFileError as exc:
        raise UserError(str(exc)) from exc
    what = {"observe": "observing", "shadow": "shadowing", "enforce": "enforcing"}[settings.mode]
    err_console.print(
        f"dynasor {what} {settings.upstream_url} on http://{settings.host}:{settings.port} "
        f"(probe rate {settings.probe_rate:g}, every {settings.probe_interval} tokens"
        + (f"; policy {settings.policy_file}" if settings.policy_file else "")
        + (f", {settings.enforce_percent:g}% enforced" if settings.mode == "enforce" else "") + ")"
    )
    admin = None
    if settings.admin_token:
        from proxy.control.admin import AdminApp

        admin = AdminApp(app, settings.admin_token)
        err_console.print(f"admin API on http://127.0.0.1:{settings.admin_port} (token required)")
    serve(app, settings.host, settings.port, admin, settings.admin_port)


def register(app: typer.Typer) -> None:
    app.command()(observe)
