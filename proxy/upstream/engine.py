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

This module needs no vLLM (the engine is duck-typed: `generate`, `abort`), so
its logic is unit-tested with a fake engine; `proxy.upstream.vllm` starts the
real one.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from copy import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Job, JobKind
from proxy.upstream.asgi import AsgiUpstream
from proxy.upstream.base import JOB_HEADER, PROGRAM_HEADER, PROGRAM_TYPE_HEADER, Headers

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput

KINDS: frozenset[str] = frozenset(get_args(JobKind))
TAGS = (PROGRAM_HEADER, JOB_HEADER, PROGRAM_TYPE_HEADER)
MAX_TYPE = 64  # characters of a client's program type kept (the scheduler keeps a model per type)


# --- what the pipeline says about a request -------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobTag:
    program: str | None = None  # None: the request is a program of its own
    kind: JobKind | None = None  # None: "cot" for one sample, "sample" for each of n > 1
    program_type: str | None = None  # None: what its kind says (`proxy.scheduler.base.DEFAULT_TYPES`)


_TAG: contextvars.ContextVar[JobTag] = contextvars.ContextVar("dynasor_job", default=JobTag())  # noqa: B039 (frozen)


def job_tag(headers: Headers) -> JobTag:
    found = {k.lower(): v.decode("latin-1") for k, v in headers if k.lower() in TAGS}
    kind = found.get(JOB_HEADER)
    program_type = found.get(PROGRAM_TYPE_HEADER, "")[:MAX_TYPE] or None
    return JobTag(found.get(PROGRAM_HEADER) or None, kind if kind in KINDS else None,  # type: ignore[arg-type]
                  program_type)


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

    def __init__(self, engine: Any, admission: Admission,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self.admission = admission
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: SamplingParams, request_id: str,
                       **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        tag = _TAG.get()
        if sampling_params.n > 1:
            outputs = self._samples(prompt, sampling_params, request_id, tag, kwargs)
        else:
            outputs = self._one(prompt, sampling_params, request_id, tag, tag.kind or "cot", kwargs)
        async with aclosing(outputs):
            async for out in outputs:
                yield out

    async def _one(self, prompt: Any, params: SamplingParams, request_id: str, tag: JobTag,
                   kind: JobKind, kwargs: dict[str, Any], budget: int | None = None,
                   program: str | None = None) -> AsyncGenerator[RequestOutput, None]:
        """One engine request: wait for its slot, generate, abort it if it ends early."""
        job = Job(request_id, program or tag.program or request_id, kind, self._clock(), params.max_tokens,
                  _prompt_tokens(prompt), tag.program_type, budget)
        delta = params.output_kind.name == "DELTA"
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

    async def _samples(self, prompt: Any, params: SamplingParams, request_id: str, tag: JobTag,
                       kwargs: dict[str, Any]) -> AsyncGenerator[RequestOutput, None]:
        """The `n` samples of one request, each its own engine request, merged as vLLM merges them:
        streamed outputs as they come (choice index = sample), a final-only request at the end."""
        n = params.n
        final_only = params.output_kind.name == "FINAL_ONLY"
        arrived: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

        async def sample(i: int) -> None:
            # One program of n samples (the request's unless it is tagged), n the most it makes.
            outs = self._one(prompt, sample_params(params, i), f"{i}_{request_id}", tag, "sample",
                             kwargs, n, tag.program or request_id)
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
                if final_only:
                    final[i] = out
                    continue
                out.request_id, out.finished = request_id, left == 0
                yield out
            if final_only:
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


# --- the engine in this process, as serve holds it --------------------------------------------


@dataclass
class EngineLoad:
    """The engine core's own figures after its last step (vLLM's scheduler stats)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    steps: int = 0

    def record(self, stats: Any) -> None:
        self.running = stats.num_running_reqs
        self.waiting = stats.num_waiting_reqs
        self.kv_cache_usage = stats.kv_cache_usage
        self.steps += 1


@dataclass
class InProcessEngine:
    """vLLM's engine and its OpenAI server app in this process, under dynasor's admission
    (started by `proxy.upstream.vllm.start_engine`)."""

    engine: Any  # vLLM's AsyncLLM
    client: ScheduledEngine
    app: Any  # vLLM's FastAPI app over `client`
    model_name: str
    load: EngineLoad
    stats_task: asyncio.Task[None] | None = field(default=None, repr=False)

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

    def metrics(self) -> Iterator[Metric]:
        """vLLM's own Prometheus metrics (`vllm:` names), as its server's /metrics shows them.

        vLLM registers them in prometheus-client's default registry; the process collectors
        there are the proxy's own registry's already."""
        from prometheus_client import REGISTRY

        for family in REGISTRY.collect():
            if family.name.startswith("vllm"):
                yield family

    def shutdown(self) -> None:
        """Stop the engine core and its workers (child processes); waits for them."""
        if self.stats_task is not None:
            self.stats_task.cancel()
        self.engine.shutdown()
