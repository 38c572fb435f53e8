"""`serve` without vLLM: the kill switch reaches the scheduler, /health and /metrics show it,
and every request the pipeline sends upstream says which program it belongs to."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from dynasorctl.calibration.store_source import save_policy
from proxy.control import rollout
from proxy.control.rollout import RolloutState, ScopeState
from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Fcfs, Job
from proxy.scheduler.program import PROGRAM_FIFO, ProgramScheduler
from proxy.serve import (
    DEFAULT_SCHEDULER,
    SchedulerNameError,
    ServeApp,
    load_scheduler,
    scheduler_name,
    scheduling_allowed,
)
from proxy.settings import Settings
from proxy.store.db import open_store
from tests.fakes import JSON, SSE, Call, FakeResponse, ScriptedUpstream, chat_stream, probe_reply
from tests.schedulers import Lifo

POLICY = 'version = 1\nkind = "cot"\n\n[cot]\ninterval = 16\nwindow = 1\n'


class FakeEngine:
    """What ServeApp needs of the in-process engine."""

    def __init__(self, upstream: ScriptedUpstream, admission: Admission) -> None:
        self._upstream = upstream
        self.admission = admission

    def upstream(self) -> ScriptedUpstream:
        return self._upstream

    def status(self) -> dict[str, Any]:
        return {"running": self.admission.running, "dead": False}

    def metrics(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the engine.", value=0)


class Recording(Fcfs):
    """FCFS that keeps what the pipeline told it about programs."""

    def __init__(self) -> None:
        super().__init__()
        self.signals: list[tuple[str, float]] = []
        self.done: list[str] = []
        self.steps: list[tuple[str, list[float]]] = []

    def signal(self, program_id: str, certaindex: float, now: float) -> None:
        self.signals.append((program_id, certaindex))

    def program_done(self, program_id: str, now: float) -> None:
        self.done.append(program_id)

    def step_done(self, program_id: str, rewards: Sequence[float], now: float) -> None:
        self.steps.append((program_id, list(rewards)))


def scope(mode: str) -> ScopeState:
    return ScopeState("*", mode, 0.0, None, None, datetime.now(UTC), "me", "test")


def test_scheduling_is_allowed_unless_the_rollout_stops_dynasor_everywhere():
    assert scheduling_allowed(None)
    assert scheduling_allowed(RolloutState({}, 0))  # flags only
    assert scheduling_allowed(RolloutState({"*": scope("observe"), "model:m": scope("enforce")}, 3))
    assert scheduling_allowed(RolloutState({"*": scope("shadow")}, 1))
    assert not scheduling_allowed(RolloutState({"*": scope("observe"), "key:k": scope("off")}, 2))


def test_schedulers_by_name_or_import_path():
    assert DEFAULT_SCHEDULER == "dynasor" and load_scheduler("dynasor") is ProgramScheduler
    assert scheduler_name(load_scheduler("dynasor")()) == "dynasor"
    assert scheduler_name(load_scheduler("program-fifo")()) == "program-fifo"
    assert load_scheduler("program-fifo")().config == PROGRAM_FIFO
    assert load_scheduler("fcfs") is Fcfs
    assert load_scheduler("tests.schedulers:Lifo") is Lifo
    assert scheduler_name(Fcfs()) == "fcfs"
    assert scheduler_name(Lifo()) == "tests.schedulers:Lifo"
    for bad in ("nope", "tests.schedulers:Nope", "no.such.module:X", "tests.unit.test_serve:POLICY"):
        with pytest.raises(SchedulerNameError):
            load_scheduler(bad)


async def _held(admission: Admission, i: int, started: list[str], gate: asyncio.Event) -> None:
    async with admission.slot(Job(f"r{i}", f"p{i}", "cot", 0.0)):
        started.append(f"r{i}")
        await gate.wait()


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_kill_switch_hands_the_queue_to_fcfs_and_a_new_rollout_hands_it_back(tmp_path):
    db = f"sqlite:///{tmp_path}/serve.db"
    store = open_store(db)
    admission = Admission(Lifo(), capacity=1)
    app = ServeApp(Settings(db_url=db, rollout_poll_s=0.05),
                   FakeEngine(ScriptedUpstream(lambda call: FakeResponse()), admission), Lifo)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve")
    started: list[str] = []
    gate = asyncio.Event()
    async with app:
        first = asyncio.create_task(_held(admission, 0, started, gate))
        await _until(lambda: started == ["r0"])
        rest = []
        for i in (1, 2, 3):  # queued in this order, one at a time
            rest.append(asyncio.create_task(_held(admission, i, started, gate)))
            await _until(lambda n=i: admission.queued == n)
        assert (await client.get("/health")).json()["scheduler"]["name"].endswith(":Lifo")

        await asyncio.to_thread(rollout.kill, store, reason="test", who="me")
        await _until(lambda: app.fallback)
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
        assert health["scheduler"] == {"name": "fcfs", "fallback": True, "capacity": 1, "running": 1,
                                       "queued": 3}
        assert "dynasor_scheduler_fallback 1" in metrics and "dynasor_scheduler_queued 3" in metrics
        assert "vllm:num_requests_running 0.0" in metrics  # the engine's own metrics follow ours
        gate.set()
        await asyncio.gather(first, *rest)
        assert started == ["r0", "r1", "r2", "r3"]  # first come, first served: not LIFO's 3, 2, 1

        save_policy(store, "cot", "*", POLICY, "test")
        await asyncio.to_thread(rollout.set_scope, store, "*", mode="shadow", policy="latest",
                                reason="test", who="me")
        await _until(lambda: not app.fallback)
        assert isinstance(admission.scheduler, Lifo)
    await client.aclose()


async def test_requests_tell_the_upstream_their_program_and_kind():
    """A lone request is its own program; n > 1 and tagged requests are samples of theirs;
    probes belong to the request they probe."""
    def handler(call: Call) -> FakeResponse:
        if b"boxed{" in call.body:
            return probe_reply("7}")
        if call.body and call.json().get("stream"):
            return FakeResponse(200, list(SSE), chat_stream(["x"] * 16), delay_s=0.01)
        choices = [{"index": i, "message": {"role": "assistant", "content": "so \\boxed{7}"},
                    "finish_reason": "stop"} for i in range(call.json().get("n", 1) if call.body else 0)]
        return FakeResponse(200, list(JSON), [json.dumps({"choices": choices}).encode()])

    upstream = ScriptedUpstream(handler)
    scheduler = Recording()
    app = ServeApp(Settings(probe_interval=8), FakeEngine(upstream, Admission(scheduler, 4)), Fcfs,
                   write=lambda records: None)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve")
    body = {"model": "m", "messages": [{"role": "user", "content": "6 * 7?"}]}
    async with app:
        await client.post("/v1/chat/completions", json={**body, "stream": True})
        await client.post("/v1/chat/completions", json={**body, "n": 2})
        await client.post("/v1/chat/completions", json=body, headers={"x-dynasor-program": "p7"})
        await client.get("/v1/models")
    await client.aclose()
    def tag(call: Call) -> tuple[bytes | None, bytes | None]:
        return call.header(b"x-dynasor-program"), call.header(b"x-dynasor-job")

    completions = [c for c in upstream.calls if c.path == "/v1/chat/completions"]
    probes = [tag(c) for c in completions if b"boxed{" in c.body]
    main, n2, tagged = [tag(c) for c in completions if b"boxed{" not in c.body]
    assert main[1] == b"cot" and main[0]
    assert probes and all(p == (main[0], b"probe") for p in probes)
    assert n2[1] == b"sample" and n2[0] not in (None, main[0])
    assert tagged == (b"p7", b"sample")
    (models,) = [c for c in upstream.calls if c.path == "/v1/models"]
    assert tag(models) == (None, None)  # not a generation: nothing to say

    # What the scheduler heard: each probe's certaindex and each sample's, under the program;
    # the programs of their own are done when their request ends, the tagged one is not.
    main_program, n2_program = main[0].decode(), n2[0].decode()
    heard = {p for p, _ in scheduler.signals}
    assert sum(p == main_program for p, _ in scheduler.signals) == len(probes)
    assert heard == {main_program, n2_program, "p7"}
    assert main_program in scheduler.done and n2_program in scheduler.done and "p7" not in scheduler.done


def _serve_app(scheduler: Recording, upstream: ScriptedUpstream | None = None) -> ServeApp:
    upstream = upstream or ScriptedUpstream(lambda call: FakeResponse())
    return ServeApp(Settings(), FakeEngine(upstream, Admission(scheduler, 2)), Fcfs, write=lambda records: None)


async def test_a_program_reports_its_steps_rewards_to_the_scheduler():
    scheduler = Recording()
    upstream = ScriptedUpstream(lambda call: FakeResponse())
    app = _serve_app(scheduler, upstream)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve")
    async with app:
        r = await client.post("/v1/programs/tree-7/steps", json={"rewards": [0.25, 1, 0]})
        assert r.status_code == 200
        assert r.json() == {"object": "program.step", "program": "tree-7", "rewards": 3, "done": False}
        r = await client.post("/v1/programs/a%2Fb/steps", json={"rewards": [0.5], "done": True})
        assert r.status_code == 200 and r.json()["program"] == "a/b"
        await client.get("/v1/programs/tree-7/steps")  # not a report: the engine's app answers
    await client.aclose()
    assert scheduler.steps == [("tree-7", [0.25, 1.0, 0.0]), ("a/b", [0.5])]
    assert scheduler.done == ["a/b"]  # done: true ends the program
    assert [c.path for c in upstream.calls] == ["/v1/programs/tree-7/steps"]


@pytest.mark.parametrize("body, param, words", [
    (b'{"rewards": [1.5]}', "rewards", "less than or equal to 1"),
    (b'{"rewards": [-0.1]}', "rewards", "greater than or equal to 0"),
    (b'{"rewards": [NaN]}', "rewards", "finite"),
    (b'{"rewards": ["0.5"]}', "rewards", "valid number"),
    (b'{"rewards": [true]}', "rewards", "valid number"),
    (b'{"rewards": []}', "rewards", "at least 1"),
    (b'{"reward": [0.5]}', "rewards", "Field required"),
    (b'{"rewards": [0.5], "done": "yes"}', "done", "valid boolean"),
    (b'[0.5]', None, "valid dictionary"),
    (b'{"rewards": [0.5', None, "not valid JSON"),
    (b'\xff', None, "not valid JSON"),
])
async def test_a_bad_step_report_is_an_openai_400_and_reaches_nobody(body, param, words):
    scheduler = Recording()
    app = _serve_app(scheduler)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve")
    async with app:
        r = await client.post("/v1/programs/p1/steps", content=body)
        long_id = await client.post(f"/v1/programs/{'x' * 300}/steps", json={"rewards": [0.5]})
    await client.aclose()
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["param"] == param and words in error["message"]
    assert long_id.status_code == 400 and long_id.json()["error"]["param"] == "program_id"
    assert scheduler.steps == [] and scheduler.done == []
