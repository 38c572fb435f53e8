"""Starting vLLM in this process for `serve`: its own argument parser, engine and server app.

Only `dynasorctl serve` imports this module (after making sure vLLM imports: `make engine`).
"""

from __future__ import annotations

import asyncio
import time
from argparse import Namespace
from collections.abc import Callable
from typing import Any

from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Scheduler
from proxy.upstream.engine import EngineLoad, InProcessEngine, ScheduledEngine


class EngineOptionError(ValueError):
    """Engine options vLLM refuses (unknown, malformed or inconsistent), in vLLM's words."""


def parse_engine_args(model: str, options: list[str]) -> Namespace:
    """vLLM's own server arguments for `model` and the operator's engine options."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> Any:  # argparse would print usage and exit
            raise EngineOptionError(message)

    parser = make_arg_parser(Parser(prog="dynasorctl serve"))
    try:
        args = parser.parse_args(["--model", model, *options])
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:
        raise EngineOptionError(str(exc).removeprefix("Error: ")) from exc
    return args


class _LoadLogger(StatLoggerBase):
    """A vLLM stat logger that keeps the engine core's figures in an `EngineLoad`."""

    def __init__(self, load: EngineLoad) -> None:
        self.load = load

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.load.record(scheduler_stats)

    def log_engine_initialized(self) -> None:
        pass


async def start_engine(args: Namespace, scheduler: Scheduler, capacity: int | None,
                       clock: Callable[[], float] = time.monotonic) -> InProcessEngine:
    """Start vLLM from its own parsed server arguments (`parse_engine_args`).

    Blocks the event loop while the engine core starts (nothing else runs yet).
    `capacity` defaults to the engine's batch limit (`max_num_seqs`).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.usage.usage_lib import UsageContext

    engine_args = AsyncEngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    load = EngineLoad()
    engine = AsyncLLM.from_vllm_config(
        config, usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[lambda vllm_config, engine_index=0: _LoadLogger(load)],
        enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats)
    try:
        admission = Admission(scheduler, capacity or config.scheduler_config.max_num_seqs, clock)
        client = ScheduledEngine(engine, admission, clock)
        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(client, app.state, args, tasks)  # type: ignore[arg-type]
    except BaseException:
        engine.shutdown()
        raise
    names = args.served_model_name or [args.model]
    served = InProcessEngine(engine, client, app, names[0], load)
    if not engine_args.disable_log_stats:
        served.stats_task = asyncio.create_task(_log_stats(engine), name="dynasor-engine-stats")
    return served


async def _log_stats(engine: AsyncLLM) -> None:
    """vLLM's periodic throughput line, as its own server logs it."""
    from vllm import envs

    while True:
        await asyncio.sleep(envs.VLLM_LOG_STATS_INTERVAL)
        await engine.do_log_stats()
