"""`serve`: the proxy's pipeline and control plane over dynasor's own in-process engine.

`ServeApp` is the proxy app (routes, observation, probes, store, policies,
rollout, guardrails, admin API, metrics) whose upstream is the in-process
engine (`proxy.upstream.engine`, started by `proxy.upstream.vllm`). What only `serve` adds:

- what the pipeline learns about each program (each probe's or sample's certaindex, a
  program done or stopped) reaches the scheduler through the admission, and so do the
  step rewards multi-step programs report (`POST /v1/programs/{id}/steps`, `proxy.steps`);
- the scheduler's queue and the engine's own batch on /health and /metrics;
- the kill switch reaches the scheduler: while the rollout in the store puts
  every scope in observe or off (where `dynasorctl rollout kill` leaves them),
  requests are admitted first come, first served; once a scope is shadowed or
  enforced again, the configured scheduler is back. Neither needs a restart:
  the queue is handed over (`Admission.replace`).

This module imports no vLLM: the engine is handed in.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from proxy.control.rollout import NEEDS_POLICY, RolloutState
from proxy.pipeline.app import ProxyApp
from proxy.pipeline.exchange import (
    JSON_HEADERS,
    BodyTimeout,
    Receive,
    Scope,
    Send,
    read_body,
    respond,
)
from proxy.pipeline.sse import error_body
from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Fcfs, Scheduler
from proxy.scheduler.program import PROGRAM_FIFO, ProgramScheduler
from proxy.settings import Settings
from proxy.steps import StepError, StepReport, parse_step, program_of
from proxy.store.recorder import Record
from proxy.upstream.base import Upstream

log = logging.getLogger(__name__)

SchedulerFactory = Callable[[], Scheduler]



def program_fifo() -> ProgramScheduler:
    return ProgramScheduler(PROGRAM_FIFO)


# The schedulers `dynasorctl serve --scheduler NAME` knows by name (the first is the
# default); any other NAME is `module:attribute`, a callable that returns a
# `proxy.scheduler.base.Scheduler`.
SCHEDULERS: dict[str, SchedulerFactory] = {"dynasor": ProgramScheduler, "fcfs": Fcfs,
                                           "program-fifo": program_fifo}
DEFAULT_SCHEDULER = next(iter(SCHEDULERS))


class SchedulerNameError(ValueError):
    """A scheduler name that is neither known nor an importable `module:attribute`."""


def load_scheduler(name: str) -> SchedulerFactory:
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise SchedulerNameError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)} "
                                 "or module:attribute")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise SchedulerNameError(f"cannot load scheduler {name!r}: {exc}") from exc
    if not callable(factory):
        raise SchedulerNameError(f"scheduler {name!r} is not callable")
    return factory


def scheduler_name(scheduler: Scheduler) -> str:
    kind = type(scheduler)
    if kind is ProgramScheduler:
        return "program-fifo" if scheduler.config == PROGRAM_FIFO else "dynasor"  # type: ignore[attr-defined]
    if kind is Fcfs:
        return "fcfs"
    return f"{kind.__module__}:{kind.__qualname__}"


def scheduling_allowed(state: RolloutState | None) -> bool:
    """Whether the configured scheduler may run: not while the store's rollout stops dynasor
    everywhere (every scope in observe or off, as a kill leaves it). With no rollout state,
    the flags apply and it runs."""
    if state is None or not state.scopes:
        return True
    return any(scope.mode in NEEDS_POLICY for scope in state.scopes.values())


class ServedEngine(Protocol):
    """What `ServeApp` needs of the engine (`proxy.upstream.engine.InProcessEngine`)."""

    @property
    def admission(self) -> Admission: ...

    def upstream(self) -> Upstream: ...

    def status(self) -> dict[str, Any]: ...

    def metrics(self) -> Iterable[Metric]: ...


class ServeApp(ProxyApp):
    def __init__(self, settings: Settings, engine: ServedEngine, scheduler: SchedulerFactory,
                 write: Callable[[Sequence[Record]], None] | None = None) -> None:
        super().__init__(settings, engine.upstream(), write, signals=engine.admission)
        self.engine = engine
        self.registry.register(_ServeCollector(self))
        self._scheduler = scheduler
        self.fallback = False  # admitting FCFS because the rollout was killed
        self._follow: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        await super().startup()
        self.follow_rollout()
        self._follow = asyncio.create_task(self._follow_rollout(), name="dynasor-serve-scheduler")

    async def shutdown(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
        await super().shutdown()

    def follow_rollout(self) -> None:
        """Put the admission on FCFS while the rollout is killed, on the scheduler otherwise."""
        allowed = scheduling_allowed(self.control.state)
        if allowed == (not self.fallback):
            return
        admission = self.engine.admission
        admission.replace(self._scheduler() if allowed else Fcfs())
        self.fallback = not allowed
        log.warning("rollout %s: admitting with %s (%d queued)",
                    "resumed" if allowed else "killed", scheduler_name(admission.scheduler),
                    admission.queued)

    async def _follow_rollout(self) -> None:
        # The rollout state is reloaded by the control plane; reading it here is a dict lookup.
        while True:
            await asyncio.sleep(self.settings.rollout_poll_s)
            self.follow_rollout()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        program = program_of(_raw_path(scope)) if scope["type"] == "http" else None
        if program is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        try:
            raw = await read_body(receive, self.settings.request_body_timeout_s)
            report = parse_step(program, raw)
        except (StepError, BodyTimeout) as exc:
            await respond(send, 400, error_body(str(exc), "invalid_request_error", 400,
                                                getattr(exc, "param", None)), JSON_HEADERS)
            return
        self.report_step(report)
        answer = {"object": "program.step", "program": report.program_id, "rewards": len(report.rewards),
                  "done": report.done}
        await respond(send, 200, json.dumps(answer).encode(), JSON_HEADERS)

    def report_step(self, report: StepReport) -> None:
        """A multi-step program's step reaches the scheduler (`proxy.steps`)."""
        admission = self.engine.admission
        admission.step_done(report.program_id, report.rewards)
        if report.done:
            admission.program_done(report.program_id)

    def health(self) -> dict[str, Any]:
        out = super().health()
        admission = self.engine.admission
        out["scheduler"] = {"name": scheduler_name(admission.scheduler), "fallback": self.fallback,
                            "capacity": admission.capacity, "running": admission.running,
                            "queued": admission.queued}
        out["engine"] = engine = self.engine.status()
        if engine.get("dead"):
            out["status"] = "degraded"
        return out


def _raw_path(scope: Scope) -> str:
    """The path as sent, still percent-encoded (a program id may hold a `/`: `%2F`)."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1").partition("?")[0] if raw else scope["path"]


class _ServeCollector:
    """What /metrics adds under `serve`: the scheduler's gauges, then the engine's own."""

    def __init__(self, app: ServeApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        admission = self.app.engine.admission
        gauges = [
            ("dynasor_scheduler_running", "Requests admitted into the engine.", admission.running),
            ("dynasor_scheduler_queued", "Requests waiting for the scheduler.", admission.queued),
            ("dynasor_scheduler_capacity", "Most requests in the engine at once.", admission.capacity),
            ("dynasor_scheduler_fallback", "1 while the kill switch has serve on FCFS.",
             int(self.app.fallback)),
        ]
        for name, help_, value in gauges:
            yield GaugeMetricFamily(name, help_, value=value)
        yield from self.app.engine.metrics()
