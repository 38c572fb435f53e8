"""`bench serve` on the real engine: vLLM's AsyncLLM in this process, dynasor's admission first.

Runs in the engine's environment (`.venv-engine`, which has vLLM but not everything the
CLI needs): `python -m dynasorctl.bench.serve.engine` reads a job (JSON) on stdin and
writes JSON lines on its stdout (one a finished program, one a finished cell, one with
the fitted step costs); vLLM's own output goes to stderr. Requests enter the engine
only through `proxy.scheduler.admission.Admission`, so the scheduler's order is the
engine's: the same scheduler objects and program state machines as the simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from dynasorctl.bench.serve.arms import ARMS, Arm, CellResult, Outcome, Timed
from dynasorctl.bench.serve.programs import Actions, ProgramRun, Request, run_for
from dynasorctl.bench.serve.workload import Program, program_from_json
from proxy.scheduler.admission import Admission


def prompt_ids(program_id: str, length: int, vocab: int) -> list[int]:
    """A program's prompt: token ids of its own (samples share them, so the cache does)."""
    rng = random.Random(program_id)
    return [rng.randrange(100, vocab - 100) for _ in range(length)]


class CellRun:
    """One arm on one arrival trace, on the engine; `run` returns what each program did."""

    def __init__(self, engine: Any, arm: Arm, capacity: int, vocab: int,
                 on_program: Callable[[], None]) -> None:
        self.engine = engine
        self.arm = arm
        self.vocab = vocab
        self.on_program = on_program
        self.scheduler = Timed(arm.scheduler())
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        self.admission = Admission(self.scheduler, capacity, lambda: loop.time() - self.t0)
        self.suffix = prompt_ids("probe suffix", 64, vocab)
        self.state: dict[str, str] = {}  # request id -> queued, running, aborting, ended
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.text: dict[str, list[int]] = {}  # main requests' prompt and generated ids
        self.finish: dict[str, float] = {}
        self.tokens: dict[str, list[int]] = {}  # program id -> [generated, of which probes]

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    async def run(self, programs: list[Program], horizon: float) -> CellResult:
        runs = [run_for(p, self.arm.stopping) for p in programs]
        starters = [asyncio.create_task(self._program(r)) for r in runs]
        everything = asyncio.gather(*starters)
        try:
            await asyncio.wait_for(self._all_done(runs, everything), timeout=horizon)
        except TimeoutError:
            pass
        for request_id in list(self.state):  # the run is over: end what is left
            self._abort(request_id)
        everything.cancel()
        await asyncio.gather(everything, *self.tasks.values(), return_exceptions=True)
        outcomes = [Outcome(r.program.program_id, r.template.type, r.template.difficulty,
                            r.program.arrival, self.finish.get(r.program.program_id),
                            *self.tokens.get(r.program.program_id, [0, 0]), r.stopped, r.correct)
                    for r in runs]
        for o in outcomes:
            if o.finish is not None and o.finish > horizon:
                o.finish = None
        return CellResult(outcomes, self.scheduler.seconds, self.scheduler.admitted,
                          self.scheduler.peak_queued)

    async def _all_done(self, runs: list[ProgramRun], starters: asyncio.Future[Any]) -> None:
        await starters
        while not all(r.done for r in runs):
            await asyncio.sleep(0.05)

    async def _program(self, run: ProgramRun) -> None:
        await asyncio.sleep(max(0.0, run.program.arrival - self.now()))
        self.tokens[run.program.program_id] = [0, 0]
        self._apply(run, run.start())

    def _apply(self, run: ProgramRun, actions: Actions) -> None:
        program_id = run.program.program_id
        for request in actions.submit:
            self.state[request.request_id] = "queued"
            self.tasks[request.request_id] = asyncio.create_task(self._request(request, run))
        for request_id in actions.abort:
            self._abort(request_id)
        if actions.signal is not None:
            self.admission.signal(program_id, actions.signal)
        if actions.done:
            self.finish[program_id] = self.now()
            self.admission.program_done(program_id)
            self.on_program()

    def _abort(self, request_id: str) -> None:
        state = self.state.get(request_id)
        if state == "queued":
            self.tasks[request_id].cancel()  # still waiting for a slot: it leaves the queue
        elif state == "running":
            self.state[request_id] = "aborting"  # by id: cancelling generate() may leak it
            asyncio.create_task(self.engine.abort(request_id))

    def _prompt(self, request: Request, template_prompt: int) -> list[int]:
        if request.parent is not None:
            parent = self.text[request.parent]
            context = template_prompt + request.position
            return parent[:context] + self.suffix[: request.prompt_tokens - context]
        ids = prompt_ids(request.program_id, request.prompt_tokens, self.vocab)
        if request.kind != "probe":
            self.text[request.request_id] = list(ids)
        return ids

    async def _request(self, request: Request, run: ProgramRun) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        request_id = request.request_id
        counts = self.tokens[request.program_id]
        generated = 0
        ended_by_itself = False
        try:
            job = request.job(self.now(), run.template.type, run.budget)
            async with self.admission.slot(job):
                self.state[request_id] = "running"
                params = SamplingParams(max_tokens=request.tokens, ignore_eos=True,
                                        temperature=1.0, detokenize=False,
                                        output_kind=RequestOutputKind.DELTA)
                ids = self._prompt(request, run.template.prompt_tokens)
                text = self.text.get(request_id)
                async for out in self.engine.generate({"prompt_token_ids": ids}, params,
                                                      request_id):
                    new = out.outputs[0].token_ids
                    generated += len(new)
                    if text is not None:
                        text.extend(new)
                    self.admission.progress(request_id, generated)
                    if self.state[request_id] == "running" and not run.done:
                        self._apply(run, run.tokens(request_id, generated))
                    if out.finished:
                        ended_by_itself = out.outputs[0].finish_reason == "length"
        finally:
            self.state.pop(request_id, None)
            counts[0] += generated
            if request.kind == "probe":
                counts[1] += generated
        if ended_by_itself and not run.done:
            self._apply(run, run.finished(request_id, generated))


def engine_args(job: dict[str, Any]) -> Any:
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(model=job["model"], max_model_len=job["max_model_len"],
                           max_num_seqs=job["capacity"], enable_prefix_caching=True,
                           block_size=job["cache_block"],
                           dtype="bfloat16", enforce_eager=True, disable_log_stats=True,
                           seed=0)


async def serve(job: dict[str, Any], cells: Callable[[], Awaitable[dict[str, Any]]],
                emit: Callable[[dict[str, Any]], None]) -> None:
    """Start the engine, time its steps (`job["fit"]` repeats), then run the cells asked for."""
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args(job))
    try:
        vocab = engine.get_tokenizer().vocab_size
        if job.get("fit"):
            from dynasorctl.bench.serve.fit import measure

            await measure(engine, vocab, job["fit"], lambda sample: emit({"sample": sample}))
        emit({"ready": True})
        for i, cell in enumerate((await cells()).get("cells", [])):
            programs = [program_from_json(p) for p in cell["programs"]]
            run = CellRun(engine, ARMS[cell["arm"]], job["capacity"], vocab,
                          lambda: emit({"tick": 1}))
            result = await run.run(programs, cell["horizon"])
            emit({"cell": i, "result": asdict(result)})
            while engine.output_processor.has_unfinished_requests():
                await asyncio.sleep(0.05)
            await engine.reset_prefix_cache()  # each cell starts cold, as every other
    finally:
        engine.shutdown()


def main() -> None:
    """Two JSON lines on stdin: the engine and what to measure; once it says it is ready, the
    cells (planned from the measurement)."""
    # Our results go to the real stdout; anything vLLM prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    job = json.loads(sys.stdin.readline())

    def emit(line: dict[str, Any]) -> None:
        out.write(json.dumps(line) + "\n")

    async def cells() -> dict[str, Any]:
        line = await asyncio.to_thread(sys.stdin.readline)
        return json.loads(line) if line.strip() else {}

    async def until_stopped() -> None:
        # SIGTERM (the bench ending early) cancels the run, so the engine is shut down and
        # its own processes do not outlive this one.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await serve(job, cells, emit)

    asyncio.run(until_stopped())


if __name__ == "__main__":
    main()
