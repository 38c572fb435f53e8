"""`dynasorctl serve` on the real in-process engine (vLLM CPU build + SmolLM2-135M).

One server for the module (the engine takes about 30 s to start): `--max-num-seqs 2`, so
capacity 2, dynasor's
program scheduler (`tests.schedulers:Logged`: the default one, writing down what reaches
it), and probes off for observed requests, so only the requests a test sends wait for
slots. The tests run in file order: the kill switch and enforce tests change the rollout
in the store; the last one shuts the server down. Every wait is on a condition (the
server's /health, a stream's first chunk), so the tests hold on a loaded machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dynasorctl.calibration.store_source import save_policy
from proxy.control import rollout
from proxy.store.db import open_store
from proxy.store.models import RequestRow
from tests.schedulers import JOB_LOG

try:  # a package module if tests/integration ever gets an __init__.py
    from .checks import STOP_AT_FIRST_PROBE, STORY
    from .launch import MODEL, MODEL_NAME, ROOT, free_port
    from .serve_server import DYNASORCTL, ENV, start_serve
except ImportError:
    from checks import STOP_AT_FIRST_PROBE, STORY
    from launch import MODEL, MODEL_NAME, ROOT, free_port
    from serve_server import DYNASORCTL, ENV, start_serve

# The test scheduler must import in the server; PYTHONPATH puts this checkout first.
SERVE_ENV = {**ENV, "PYTHONPATH": str(ROOT)}
HOLD = 400  # tokens a slot-holding stream asks for: it is closed long before
SHORT = 8
SHORT_PACED = 10  # past 8 tokens, so the scheduler learns the engine's pace from them
LONG = 64
# Past the engine's first KV block (128 tokens on CPU): only whole blocks are prefix-cached.
LONG_PROMPT = [{"role": "system", "content": "You tell vivid, detailed stories about animals. " * 30},
               *STORY]


@dataclass
class Served:
    url: str
    proc: subprocess.Popen
    db: str
    jobs: Path  # every job the test scheduler was given (tests.schedulers.JOB_LOG)

    def told(self) -> list[dict[str, Any]]:
        """Everything the scheduler was told so far, in order."""
        return [json.loads(line) for line in self.jobs.read_text().splitlines()]

    def jobs_of(self, request_id: str) -> list[dict[str, Any]]:
        """The engine requests of one vLLM request id: itself, or its samples (`i_<id>`)."""
        return [j for j in self.told() if "request_id" in j and (
            j["request_id"] == request_id or j["request_id"].partition("_")[2] == request_id)]

    def events(self, event: str, program: str) -> list[dict[str, Any]]:
        return [e for e in self.told() if e.get("event") == event and e["program"] == program]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "serve.toml"
    config.write_text("rollout_poll_s = 0.2\n")
    db = f"sqlite:///{tmp}/serve.db"
    jobs = tmp / "jobs.jsonl"
    jobs.touch()
    options = ("--scheduler", "tests.schedulers:Logged", "--probe-rate", "0",
               "--config", str(config))
    # The engine's batch limit is the admission's capacity.
    with start_serve(db=db, options=options, env={**SERVE_ENV, JOB_LOG: str(jobs)},
                     engine=("--max-num-seqs", "2")) as (url, proc):
        yield Served(url, proc, db, jobs)


async def health(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    LAST_HEALTH.clear()
    LAST_HEALTH.update((await http.get(f"{url}/health")).json())
    return dict(LAST_HEALTH)


LAST_HEALTH: dict[str, Any] = {}  # the last /health a test read, for failure messages


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}; last /health {LAST_HEALTH}"
        await asyncio.sleep(0.1)


def chat(max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": STORY, "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True, "temperature": 0.7, **extra}


@dataclass
class Stream:
    """A stream that has started generating; it stays open until `close` (dropping `chunks`
    would close it: an abandoned async iterator is closed when it is collected)."""

    resp: httpx.Response
    chunks: Any

    async def next(self) -> bytes:
        return await anext(self.chunks)

    async def close(self) -> None:
        await self.resp.aclose()


async def open_stream(http: httpx.AsyncClient, url: str, body: dict[str, Any],
                      headers: dict[str, str] | None = None) -> Stream:
    """A stream whose first chunk is in (so it is in the engine); the caller closes it."""
    resp = await http.send(http.build_request("POST", f"{url}/v1/chat/completions", json=body,
                                              headers=headers), stream=True)
    assert resp.status_code == 200
    stream = Stream(resp, resp.aiter_raw())
    await stream.next()
    return stream


async def admission_order(http: httpx.AsyncClient, url: str, requests: dict[str, dict[str, Any]],
                          before_release: Callable[[], Awaitable[None]]) -> tuple[list[str], list[str]]:
    """The named requests (a chat body each) arrive in that order while two long streams fill
    the engine; the streams are then closed one at a time. The order in which the requests
    start generating, and the order in which they finish."""
    holders = [await open_stream(http, url, chat(HOLD)) for _ in range(2)]
    started: dict[str, float] = {}
    ended: dict[str, float] = {}

    async def one(name: str, body: dict[str, Any]) -> None:
        headers = {"x-dynasor-program-type": body.pop("program_type")} if "program_type" in body else {}
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200
            async for _ in resp.aiter_raw():
                started.setdefault(name, time.monotonic())
        ended[name] = time.monotonic()

    tasks, queued = [], 0
    for name, body in requests.items():
        tasks.append(asyncio.create_task(one(name, dict(body))))
        queued += body.get("n", 1)
        await until(lambda n=queued: _queued(http, url, n), f"{name} queued")
    await before_release()
    await holders[0].close()  # a slot frees: the scheduler picks who starts
    await until(lambda: _started(started, 1), "one started")
    await holders[1].close()
    await asyncio.gather(*tasks)
    return sorted(started, key=started.__getitem__), sorted(ended, key=ended.__getitem__)


async def _queued(http: httpx.AsyncClient, url: str, n: int) -> bool:
    return (await health(http, url))["scheduler"]["queued"] == n


async def _started(started: dict[str, float], n: int) -> bool:
    return len(started) >= n


async def _nothing() -> None:
    pass


async def test_the_openai_client_gets_valid_responses(served):
    async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0,
                                  timeout=120) as client:  # closed: no socket left to the next test
        await _openai_checks(served, client)


async def _openai_checks(served: Served, client: openai.AsyncOpenAI) -> None:
    question = [{"role": "user", "content": "What is 12 + 7?"}]
    whole = await client.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=12,
                                                 temperature=0)
    assert whole.choices[0].message.content and whole.choices[0].finish_reason in ("stop", "length")
    assert 0 < whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    (job,) = served.jobs_of(whole.id)  # one engine request, a program of its own
    assert job["kind"] == "cot" and job["max_tokens"] == 12 and job["program"] != whole.id

    text = await client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=SHORT,
                                           temperature=0)
    assert text.choices[0].text and text.usage.completion_tokens <= SHORT

    stream = await client.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=SHORT,
                                                  stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) and usage is not None and 0 < usage.completion_tokens <= SHORT

    samples = await client.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=SHORT,
                                                   n=3, temperature=0.8, seed=5)
    assert sorted(c.index for c in samples.choices) == [0, 1, 2]
    assert all(c.message.content for c in samples.choices)
    assert samples.usage.completion_tokens <= 3 * SHORT
    jobs = served.jobs_of(samples.id)  # each sample its own engine request, one program
    assert len(jobs) == 3 and {j["kind"] for j in jobs} == {"sample"} and len({j["program"] for j in jobs}) == 1

    texts: dict[int, str] = defaultdict(str)
    finished: set[int] = set()
    async for chunk in await client.completions.create(model=MODEL_NAME, prompt="Once upon a time", n=2,
                                                       max_tokens=SHORT, temperature=0.8, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            finished |= {c.index} if c.finish_reason else set()
    assert set(texts) == {0, 1} == finished and all(texts.values())

    with pytest.raises(openai.NotFoundError):  # vLLM's own error, as its server words it
        await client.chat.completions.create(model="no-such-model", messages=question, max_tokens=1)


async def test_with_the_engine_full_a_later_short_program_finishes_before_an_earlier_long_one(served):
    """Approximate shortest job first: four samples of 64 tokens came first, one request of 8
    tokens later; with one slot free, dynasor starts the short one (FCFS would not)."""
    async with httpx.AsyncClient(timeout=300) as http:
        scheduler = (await health(http, served.url))["scheduler"]
        assert (scheduler["name"], scheduler["capacity"]) == ("tests.schedulers:Logged", 2)
        started, ended = await admission_order(http, served.url, {
            "long": chat(LONG, n=4, program_type="search"), "short": chat(SHORT)}, _nothing)
    assert started == ["short", "long"] and ended == ["short", "long"]


async def test_a_program_that_keeps_losing_priority_is_still_served(served):
    """Starvation guard: short requests keep coming, each predicted shorter than a long one
    that waits; past three times its predicted time alone the long one goes first."""
    url = served.url
    shorts: list[tuple[float, float]] = []  # (sent, ended) of every short request
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=300) as http:
        async def feeder() -> None:  # four at a time on two slots: some always wait
            while not stop.is_set():
                sent = time.monotonic()
                r = await http.post(f"{url}/v1/chat/completions", json=chat(SHORT_PACED, stream=False))
                assert r.status_code == 200
                shorts.append((sent, time.monotonic()))

        feeders = [asyncio.create_task(feeder()) for _ in range(4)]
        await until(lambda: _done_shorts(shorts, 4), "the short requests flowing")
        sent = time.monotonic()
        long = await open_stream(http, url, chat(LONG), {"x-dynasor-program-type": "long"})
        started = time.monotonic()
        overtaken = sum(1 for s, e in shorts if s > sent and e < started)
        stop.set()
        rest = [c async for c in long.chunks]
        await long.close()
        await asyncio.gather(*feeders)
    assert b"".join(rest).rstrip().endswith(b"data: [DONE]")  # served to its end
    assert overtaken >= 2  # it lost priority to requests that came after it, then was served


async def _done_shorts(shorts: list[tuple[float, float]], n: int) -> bool:
    return len(shorts) >= n


async def test_a_closed_stream_is_aborted_in_the_engine_and_frees_its_slot(served):
    url = served.url
    async with httpx.AsyncClient(timeout=300) as http:
        async def load(scheduler: int, engine: int) -> bool:
            h = await health(http, url)
            return (h["scheduler"]["running"], h["engine"]["running"], h["engine"]["unfinished"]) == (
                scheduler, engine, engine)

        first, second = [await open_stream(http, url, chat(HOLD)) for _ in range(2)]
        await until(lambda: load(2, 2), "both streams in the engine")
        await first.close()  # the client goes away
        await until(lambda: load(1, 1), "the closed stream left the engine")
        assert await second.next()  # the other one still streams
        await second.close()
        await until(lambda: load(0, 0), "the engine is empty")
        metrics = (await http.get(f"{url}/metrics")).text
    running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
    assert running and all(line.endswith(" 0.0") for line in running)  # the engine's own gauge


async def test_the_kill_switch_falls_back_to_fcfs_without_a_restart(served):
    store = open_store(served.db)
    save_policy(store, "cot", "*", STOP_AT_FIRST_PROBE, "serve test")
    # A scope shadowed where these requests do not fall: dynasor schedules, they stay observed.
    await asyncio.to_thread(rollout.set_scope, store, "model:unused", mode="shadow", policy="latest",
                            reason="serve test", who="test")
    async with httpx.AsyncClient(timeout=300) as http:
        async def fallback(on: bool) -> bool:
            s = (await health(http, served.url))["scheduler"]
            return s["fallback"] == on and (s["name"] == "fcfs") == on

        await until(lambda: fallback(False), "dynasor's scheduler admitting")

        async def kill() -> None:
            await asyncio.to_thread(rollout.kill, store, reason="serve test", who="test")
            await until(lambda: fallback(True), "FCFS after the kill")

        # dynasor would start B and C, predicted shorter, before A: FCFS keeps arrival order
        started, _ = await admission_order(http, served.url, {
            "A": chat(LONG, program_type="long"), "B": chat(SHORT), "C": chat(SHORT)}, kill)
        assert started == ["A", "B", "C"]  # the queue was handed to FCFS as it came
        await asyncio.to_thread(rollout.set_scope, store, "model:unused", mode="shadow",
                                reason="serve test", who="test")
        await until(lambda: fallback(False), "dynasor's scheduler back")
    assert served.proc.poll() is None  # no restart


async def test_a_multi_step_program_reports_its_step_rewards(served):
    async with httpx.AsyncClient(timeout=300) as http:
        r = await http.post(f"{served.url}/v1/chat/completions", json=chat(SHORT, stream=False),
                            headers={"x-dynasor-program": "tree-1", "x-dynasor-program-type": "mcts"})
        assert r.status_code == 200
        ok = await http.post(f"{served.url}/v1/programs/tree-1/steps", json={"rewards": [0.75, 0.25]})
        bad = await http.post(f"{served.url}/v1/programs/tree-1/steps", json={"rewards": [2]})
        done = await http.post(f"{served.url}/v1/programs/tree-1/steps", json={"rewards": [1], "done": True})
    assert ok.status_code == 200 and ok.json()["rewards"] == 2 and done.status_code == 200
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rewards"
    (job,) = served.jobs_of(r.json()["id"])
    assert (job["program"], job["type"]) == ("tree-1", "mcts")
    assert [e["rewards"] for e in served.events("step", "tree-1")] == [[0.75, 0.25], [1.0]]
    assert served.events("done", "tree-1")


def _counter(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def test_an_enforced_stop_aborts_the_engine_request_and_frees_its_slot(served):
    store = open_store(served.db)
    await asyncio.to_thread(rollout.set_scope, store, "*", mode="enforce", percent=100.0, policy="latest",
                            reason="serve test", who="test")
    url = served.url
    async with httpx.AsyncClient(timeout=300) as http:
        async def enforcing() -> bool:
            scopes = (await health(http, url))["rollout"].get("scopes", {})
            return scopes.get("*", {}).get("mode") == "enforce"

        await until(enforcing, "the store's rollout enforced")
        before = (await http.get(f"{url}/metrics")).text
        r = await http.post(f"{url}/v1/chat/completions",
                            json=chat(HOLD, messages=LONG_PROMPT, stream_options={"include_usage": True}))
        assert r.status_code == 200 and r.headers["x-dynasor-mode"] == "enforce"
        events = [json.loads(b[6:]) for b in r.content.split(b"\n\n") if b.startswith(b"data: {")]
        stop = next(e["dynasor"] for e in events if "dynasor" in e)
        assert stop["stopped"] and stop["stop_token"] == 16  # the policy stops at its first probe
        assert events[-1]["usage"]["completion_tokens"] < HOLD
        (main,) = served.jobs_of(events[0]["id"])
        assert main["kind"] == "cot"
        assert any(j.get("kind") == "probe" and j["program"] == main["program"] for j in served.told())
        # the probe's certaindex and the program's end reached the scheduler
        assert served.events("signal", main["program"]) and served.events("done", main["program"])

        async def empty() -> bool:
            h = await health(http, url)
            return (h["scheduler"]["running"], h["engine"]["running"], h["engine"]["unfinished"]) == (0, 0, 0)

        await until(empty, "the stopped request left the engine")
        after = (await http.get(f"{url}/metrics")).text
    assert _counter(after, 'dynasor_probes_total{status="ok"}') > _counter(before, 'dynasor_probes_total{status="ok"}')
    # the probe continued the request's own text: the engine's prefix cache served it
    assert _counter(after, "vllm:prefix_cache_hits_total") > _counter(before, "vllm:prefix_cache_hits_total")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_shutdown_flushes_every_record_and_leaves_no_process(served):
    metrics = httpx.get(f"{served.url}/metrics").text
    relayed = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()  # labels sorted: code first
                  if line.startswith("dynasor_requests_total{")
                  and any(f'endpoint="{e}"' in line for e in ("/v1/chat/completions", "/v1/completions")))
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=120) == 0
    deadline = time.monotonic() + 60
    while _group_alive(served.proc.pid):  # the engine core and its workers are children
        assert time.monotonic() < deadline, "engine processes left after shutdown"
        time.sleep(0.2)
    with Session(open_store(served.db)) as s:
        assert s.scalar(select(func.count()).select_from(RequestRow)) == relayed > 0


def _taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "no such file or directory"),
    (["--model", str(MODEL), "--", "--max-model-len", "many"], "engine options: argument --max-model-len"),
    (["--model", str(MODEL), "--", "--no-such-option"], "engine options: unrecognized arguments"),
    (["--model", str(MODEL), "--", "--max-model-len", "1000000"], "the engine refused to start"),
    (["--model", str(MODEL), "--port", "TAKEN"], "cannot listen on"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(args, message, tmp_path):
    sock, taken = _taken_port()
    port = ["--port", str(free_port())] if "--port" not in args else []
    args = [str(taken) if a == "TAKEN" else a for a in args]
    with sock:
        proc = subprocess.Popen([str(DYNASORCTL), "serve", "--db", f"sqlite:///{tmp_path}/s.db", *port, *args],
                                env={**os.environ, **SERVE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, start_new_session=True)
        _, err = proc.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error:") and message in last, err[-2000:]
    assert "Traceback" not in err
    assert not _group_alive(proc.pid)  # nothing it started is left
