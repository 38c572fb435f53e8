"""ScheduledEngine on a fake engine: every generation is admitted first, ends early by abort,
and `n > 1` becomes admitted samples merged back as vLLM merges them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pytest

from proxy.scheduler.admission import Admission
from proxy.scheduler.base import Fcfs, Job
from proxy.upstream.engine import ScheduledEngine, job_context
from tests.schedulers import Lifo


class Kind(Enum):  # the names of vLLM's RequestOutputKind
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class Params:  # what ScheduledEngine reads of vLLM's SamplingParams
    n: int = 1
    seed: int | None = None
    max_tokens: int | None = 4
    output_kind: Kind = Kind.DELTA


@dataclass
class Completion:
    index: int
    token_ids: list[int]


@dataclass
class Output:
    request_id: str
    outputs: list[Completion]
    finished: bool


@dataclass
class FakeEngine:
    """Generates `tokens` tokens a request, one a step, each step when `step` is set (or at once);
    a request whose seed is `fail_seed` fails after its first token."""

    tokens: int = 3
    step: asyncio.Event | None = None
    submitted: asyncio.Event | None = None  # waited on before the first output ("submitting")
    fail_seed: int | None = None
    started: list[tuple[str, Params]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)

    async def generate(self, prompt: Any, params: Params, request_id: str, **kwargs: Any):
        self.started.append((request_id, params))
        self.running.add(request_id)
        try:
            if self.submitted is not None:
                await self.submitted.wait()
            for i in range(self.tokens):
                if self.step is not None:
                    await self.step.wait()
                await asyncio.sleep(0)
                if i == 1 and params.seed is not None and params.seed == self.fail_seed:
                    raise RuntimeError("sample failed")
                final = i == self.tokens - 1
                if params.output_kind is Kind.FINAL_ONLY and not final:
                    continue
                ids = list(range(i + 1)) if params.output_kind is not Kind.DELTA else [i]
                yield Output(request_id, [Completion(0, ids)], final)
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running)


async def drain(gen) -> list[Output]:
    return [out async for out in gen]


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)


def in_context(headers: list[tuple[bytes, bytes]], coro):
    """Run `coro` as a task in the context the in-process server gives a request with `headers`."""
    return asyncio.create_task(coro, context=job_context(headers))


class Jobs(Fcfs):
    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[Job] = []

    def submit(self, job: Job, now: float) -> None:
        self.jobs.append(job)
        super().submit(job, now)


async def test_a_generation_waits_for_its_slot_and_starts_in_the_schedulers_order():
    engine = FakeEngine(step=asyncio.Event())
    client = ScheduledEngine(engine, Admission(Lifo(), capacity=1))
    first = asyncio.create_task(drain(client.generate("p", Params(), "r0")))
    await until(lambda: engine.started)
    rest = [asyncio.create_task(drain(client.generate("p", Params(), f"r{i}"))) for i in (1, 2, 3)]
    await until(lambda: client.admission.queued == 3)
    assert [r for r, _ in engine.started] == ["r0"]  # never above capacity
    engine.step.set()
    await asyncio.gather(first, *rest)
    assert [r for r, _ in engine.started] == ["r0", "r3", "r2", "r1"]
    assert engine.aborted == [] and client.admission.running == 0


async def test_a_generation_closed_early_is_aborted_by_id_and_frees_its_slot():
    engine = FakeEngine(tokens=10)
    client = ScheduledEngine(engine, Admission(Fcfs(), capacity=1))
    gen = client.generate("p", Params(), "r0")
    await anext(gen)
    assert client.admission.running == 1
    await gen.aclose()  # the client left, or an enforced stop closed the response
    assert engine.aborted == ["r0"] and client.admission.running == 0


async def test_a_generation_cancelled_while_being_submitted_is_aborted_by_id():
    """Cancelling vLLM's generate() mid-submit can leak the request (vLLM #57061): abort by id."""
    engine = FakeEngine(submitted=asyncio.Event())
    client = ScheduledEngine(engine, Admission(Fcfs(), capacity=1))
    task = asyncio.create_task(drain(client.generate("p", Params(), "r0")))
    await until(lambda: engine.started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == ["r0"] and client.admission.running == 0


async def test_a_finished_generation_is_not_aborted_and_reports_its_progress():
    class Progress(Fcfs):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, int]] = []

        def progress(self, request_id: str, tokens: int, now: float) -> None:
            self.seen.append((request_id, tokens))

    for kind in (Kind.DELTA, Kind.CUMULATIVE):
        scheduler = Progress()
        engine = FakeEngine()
        client = ScheduledEngine(engine, Admission(scheduler, capacity=1))
        outs = await drain(client.generate("p", Params(output_kind=kind), "r0"))
        assert outs[-1].finished and engine.aborted == []
        assert scheduler.seen == [("r0", 1), ("r0", 2), ("r0", 3)]  # tokens so far, either kind


async def test_jobs_carry_the_program_and_kind_the_pipeline_sent():
    jobs = Jobs()
    client = ScheduledEngine(FakeEngine(), Admission(jobs, capacity=4))
    await in_context([(b"x-dynasor-program", b"p1"), (b"x-dynasor-job", b"probe")],
                     drain(client.generate({"prompt_token_ids": [1, 2, 3]}, Params(max_tokens=7), "a")))
    await in_context([], drain(client.generate("p", Params(), "b")))
    await in_context([(b"x-dynasor-job", b"nonsense")], drain(client.generate("p", Params(), "c")))
    got = [(j.request_id, j.program_id, j.kind, j.max_tokens, j.prompt_tokens) for j in jobs.jobs]
    assert got == [("a", "p1", "probe", 7, 3), ("b", "b", "cot", 4, None), ("c", "c", "cot", 4, None)]
    assert [(j.type, j.budget) for j in jobs.jobs] == [("probe", None), ("cot", None), ("cot", None)]


async def test_jobs_carry_the_clients_program_type_and_n_as_the_programs_budget():
    jobs = Jobs()
    client = ScheduledEngine(FakeEngine(), Admission(jobs, capacity=4))
    typed = [(b"x-dynasor-program", b"tree"), (b"x-dynasor-program-type", b"mcts")]
    await in_context(typed, drain(client.generate("p", Params(), "a")))
    await in_context([], drain(client.generate("p", Params(n=2), "b")))
    await in_context([(b"x-dynasor-program-type", b"x" * 500)], drain(client.generate("p", Params(), "c")))
    got = [(j.program_id, j.type, j.budget) for j in jobs.jobs]
    assert got == [("tree", "mcts", None), ("b", "sc", 2), ("b", "sc", 2), ("c", "x" * 64, None)]


async def test_n_samples_are_admitted_jobs_of_one_program_merged_as_a_stream():
    jobs = Jobs()
    engine = FakeEngine()
    client = ScheduledEngine(engine, Admission(jobs, capacity=2))
    outs = await in_context([(b"x-dynasor-program", b"prog")],
                            drain(client.generate("p", Params(n=3, seed=10), "r")))
    assert [(j.request_id, j.program_id, j.kind) for j in jobs.jobs] == [
        ("0_r", "prog", "sample"), ("1_r", "prog", "sample"), ("2_r", "prog", "sample")]
    assert sorted(p.seed for _, p in engine.started) == [10, 11, 12]  # one seed each, as vLLM does
    assert all(p.n == 1 for _, p in engine.started)
    assert {o.outputs[0].index for o in outs} == {0, 1, 2} and all(o.request_id == "r" for o in outs)
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished  # done when all are
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 9 and client.admission.running == 0


async def test_n_samples_final_only_come_back_as_one_output():
    client = ScheduledEngine(FakeEngine(), Admission(Fcfs(), capacity=4))
    (out,) = await drain(client.generate("p", Params(n=2, output_kind=Kind.FINAL_ONLY), "r"))
    assert out.finished and out.request_id == "r" and [c.index for c in out.outputs] == [0, 1]


async def test_a_failed_sample_fails_the_request_and_its_other_samples_are_aborted():
    engine = FakeEngine(tokens=50, fail_seed=1)
    client = ScheduledEngine(engine, Admission(Fcfs(), capacity=4))
    with pytest.raises(RuntimeError, match="sample failed"):
        await drain(client.generate("p", Params(n=2, seed=0), "r"))
    assert set(engine.aborted) == {"0_r", "1_r"}  # the other one, and the failed one by id too
    assert client.admission.running == 0 and client.admission.queued == 0


async def test_closing_an_n_request_aborts_every_sample():
    engine = FakeEngine(tokens=50)
    client = ScheduledEngine(engine, Admission(Fcfs(), capacity=1))
    gen = client.generate("p", Params(n=3), "r")
    await anext(gen)
    assert client.admission.queued == 2  # one sample in the engine, two waiting for the slot
    await gen.aclose()
    assert engine.aborted == ["0_r"]  # the waiting ones never reached the engine
    assert client.admission.running == 0 and client.admission.queued == 0

