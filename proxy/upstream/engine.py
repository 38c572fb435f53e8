"""vLLM in this process, behind the upstream seam, with dynasor deciding the order of its work.

`serve` runs vLLM's `AsyncLLM` (its engine core is a child process, as always)
and vLLM's own OpenAI server app over it, reached through `AsgiUpstream`: the
responses are exactly vLLM's (chat templates, `n`, logprobs, reasoning fields,
errors) and the proxy pipeline runs unchanged on top, with no HTTP hop.

The app talks to a `ScheduledEngine` instead of the engine: every generation
first waits in `Admission` until the scheduler admits it, so at most
`capacity` requests are ever in the engine and the scheduler's order is the
engine's order. A request of `n > 1` samples becomes `n` engine requests, each
admitted on its own (the scheduler sees them as one program), merged back into
the one stream vLLM's server expects. A generation that ends early (the client
left, or an enforced stop closed the response) is aborted in the engine by id
(`engine.abort`), whatever point it reached: cancelling a generation while it
is being submitted can leak its state (vLLM #57061). Then its slot is free.

Which program an engine request belongs to comes from the pipeline as request
headers (`x-dynasor-program`, `x-dynasor-job`; see `proxy.upstream.base`);
vLLM's server does not pass headers to the engine, so `AsgiUpstream` runs each
request in a context that carries them (`job_context`).

Only `dynasorctl serve` imports this module: it needs vLLM (`make engine`).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from argparse import Namespace
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from copy import copy
from dataclasses import dataclass, field
from typing import Any, get_args

from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Job, JobKind, Scheduler
from proxy.upstream.asgi import AsgiUpstream
from proxy.upstream.base import JOB_HEADER, PROGRAM_HEADER, Headers

KINDS: frozenset[str] = frozenset(get_args(JobKind))


# --- what the pipeline says about a request -------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobTag:
    program: str | None = None  # None: the request is a program of its own
    kind: JobKind | None = None  # None: "cot" for one sample, "sample" for each of n > 1


_TAG: contextvars.ContextVar[JobTag] = contextvars.ContextVar("dynasor_job", default=JobTag())


def job_tag(headers: Headers) -> JobTag:
    found = {k.lower(): v.decode("latin-1") for k, v in headers if k.lower() in (PROGRAM_HEADER, JOB_HEADER)}
    kind = found.get(JOB_HEADER)
    return JobTag(found.get(PROGRAM_HEADER) or None, kind if kind in KINDS else None)  # type: ignore[arg-type]


def job_context(headers: Headers) -> contextvars.Context:
    """The context one request of the in-process server runs in: its job tag set."""
    context = contextvars.copy_context()
    context.run(_TAG.set, job_tag(headers))
    return context


# --- the engine client vLLM's server gets ---------------------------------------------------


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of an `n > 1` request, as vLLM's own parallel sampling makes it."""
    child = copy(params)
    child.n = 1
    if params.seed is not None:
        child.seed = params.seed + index  # one seed would make every sample the same
    return child


def _prompt_tokens(prompt: Any) -> int | None:
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    return len(ids) if isinstance(ids, list) else None


class ScheduledEngine:
    """vLLM's engine client with admission in front of every generation.

    Everything but `generate` is the engine's own: vLLM's server reads its
    configs, renderer and processors, and calls its other methods.
    """

    def __init__(self, engine: AsyncLLM, admission: Admission,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self.admission = admission
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: SamplingParams, request_id: str,
                       **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        tag = _TAG.get()
        program = tag.program or request_id
        if sampling_params.n > 1:
            outputs = self._samples(prompt, sampling_params, request_id, program, kwargs)
        else:
            outputs = self._one(prompt, sampling_params, request_id, program, tag.kind or "cot", kwargs)
        async with aclosing(outputs):
            async for out in outputs:
                yield out

    async def _one(self, prompt: Any, params: SamplingParams, request_id: str, program: str,
                   kind: JobKind, kwargs: dict[str, Any]) -> AsyncGenerator[RequestOutput, None]:
        """One engine request: wait for its slot, generate, abort it if it ends early."""
        job = Job(request_id, program, kind, self._clock(), params.max_tokens, _prompt_tokens(prompt))
        delta = params.output_kind == RequestOutputKind.DELTA
        async with self.admission.slot(job):
            finished, tokens = False, 0
            try:
                async with aclosing(self._engine.generate(prompt, params, request_id, **kwargs)) as outs:
                    async for out in outs:
                        generated = sum(len(o.token_ids) for o in out.outputs)
                        tokens = tokens + generated if delta else generated
                        self.admission.progress(request_id, tokens)
                        finished = out.finished
                        yield out
            finally:
                if not finished:  # by id, whatever point it reached; shielded so it happens
                    await asyncio.shield(self._engine.abort(request_id))

    async def _samples(self, prompt: Any, params: SamplingParams, request_id: str, program: str,
                       kwargs: dict[str, Any]) -> AsyncGenerator[RequestOutput, None]:
        """The `n` samples of one request, each its own engine request, merged as vLLM merges them:
        streamed outputs as they come (choice index = sample), a final-only request at the end."""
        n = params.n
        arrived: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

        async def sample(i: int) -> None:
            outs = self._one(prompt, sample_params(params, i), f"{i}_{request_id}", program, "sample",
                             kwargs)
            try:
                async with aclosing(outs):
                    async for out in outs:
                        arrived.put_nowait((i, out))
            except Exception as exc:  # handed to the request, which fails with it
                arrived.put_nowait((i, exc))

        tasks = [asyncio.create_task(sample(i), name=f"dynasor-sample {i}_{request_id}") for i in range(n)]
        final: list[RequestOutput | None] = [None] * n
        left = n
        try:
            while left:
                i, out = await arrived.get()
                if isinstance(out, Exception):
                    raise out
                for choice in out.outputs:
                    choice.index = i
                left -= out.finished
                if params.output_kind == RequestOutputKind.FINAL_ONLY:
                    final[i] = out
                    continue
                out.request_id, out.finished = request_id, left == 0
                yield out
            if params.output_kind == RequestOutputKind.FINAL_ONLY:
                yield _merged(request_id, final)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _merged(request_id: str, finals: list[RequestOutput | None]) -> RequestOutput:
    """The final outputs of every sample as one request's (the prompt's fields from the first)."""
    first = finals[0]
    assert first is not None and all(f is not None for f in finals)
    first.request_id = request_id
    first.outputs = [f.outputs[0] for f in finals if f is not None]
    first.finished = True
    return first


# --- what the engine reports about its own batch ---------------------------------------------


@dataclass
class EngineLoad:
    """The engine core's own figures after its last step (vLLM's scheduler stats)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    steps: int = 0

    def logger(self, vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        """A vLLM stat logger that keeps these figures (the factory `AsyncLLM` takes)."""
        return _LoadLogger(self)


class _LoadLogger(StatLoggerBase):
    def __init__(self, load: EngineLoad) -> None:  # noqa: D107 (vLLM calls the factory above)
        self.load = load

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.load.running = scheduler_stats.num_running_reqs
            self.load.waiting = scheduler_stats.num_waiting_reqs
            self.load.kv_cache_usage = scheduler_stats.kv_cache_usage
            self.load.steps += 1

    def log_engine_initialized(self) -> None:
        pass


# --- the engine and its server, started and stopped together ---------------------------------


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


@dataclass
class InProcessEngine:
    """vLLM's engine and its OpenAI server app in this process, under dynasor's admission."""

    engine: AsyncLLM
    client: ScheduledEngine
    app: Any  # vLLM's FastAPI app
    model_name: str
    load: EngineLoad
    _stats: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def admission(self) -> Admission:
        return self.client.admission

    def upstream(self) -> AsgiUpstream:
        return AsgiUpstream(self.app, f"engine:{self.model_name}", job_context)

    def status(self) -> dict[str, Any]:
        """For /health: the engine's own batch, and the front end's unfinished requests."""
        return {"running": self.load.running, "waiting": self.load.waiting,
                "kv_cache_usage": round(self.load.kv_cache_usage, 4),
                "unfinished": self.engine.get_num_unfinished_requests(),
                "dead": self.engine.errored}

    def metrics_text(self) -> str:
        """vLLM's own Prometheus metrics (`vllm:` names), as its server's /metrics shows them."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    def shutdown(self) -> None:
        """Stop the engine core and its workers (child processes); waits for them."""
        if self._stats is not None:
            self._stats.cancel()
        self.engine.shutdown()


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
        config, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[load.logger],
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
        served._stats = asyncio.create_task(_log_stats(engine), name="dynasor-engine-stats")
    return served


async def _log_stats(engine: AsyncLLM) -> None:
    """vLLM's periodic throughput line, as its own server logs it."""
    import vllm.envs as envs

    while True:
        await asyncio.sleep(envs.VLLM_LOG_STATS_INTERVAL)
        await engine.do_log_stats()

