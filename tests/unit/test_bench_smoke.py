"""The proxy benchmark's pieces work: the fake upstream, the floor proxy, the load, the figures.

Correctness only: no figure is asserted against a target here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from dynasorctl.bench import load, proxy_bench, report
from dynasorctl.bench.fake_upstream import STREAM_TOKENS, FakeUpstream
from dynasorctl.bench.processes import Server, free_port
from dynasorctl.commands import bench as bench_command
from dynasorctl.errors import UserError
from proxy.metrics import Metrics, exposition, registry
from proxy.pipeline.sse import SseReader

CHAT = {"model": "m", "messages": [{"role": "user", "content": "What is 6 * 7?"}]}
PROBE = {**CHAT, "stream": True, "continue_final_message": True, "add_generation_prompt": False,
         "messages": [*CHAT["messages"], {"role": "assistant", "content": "so \\boxed{"}]}


def events(raw: bytes) -> list[bytes]:
    return SseReader().feed(raw)


def deltas(raw: bytes) -> list[dict]:
    return [json.loads(e)["choices"][0]["delta"] for e in events(raw) if e != b"[DONE]"]


@pytest.fixture
async def fake():
    app = FakeUpstream()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake") as c:
        yield app, c


async def test_fake_upstream_answers_a_fixed_chat_completion(fake):
    app, client = fake
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert "\\boxed{42}" in body["choices"][0]["message"]["content"]
    assert int(r.headers["content-length"]) == len(r.content)
    assert (app.stats.requests, app.stats.streams, app.stats.probes) == (1, 0, 0)


async def test_fake_upstream_streams_64_token_chunks_in_vllms_shape(fake):
    app, client = fake
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events(r.content)[-1] == b"[DONE]"
    parts = [json.loads(e) for e in events(r.content)[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parts)
    assert parts[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert sum(1 for d in deltas(r.content) if d.get("content")) == STREAM_TOKENS
    assert parts[-1]["choices"][0]["finish_reason"] == "stop"
    assert parts[-1]["usage"]["completion_tokens"] == STREAM_TOKENS
    assert (app.stats.streams, app.stats.probes) == (1, 0)


async def test_fake_upstream_answers_a_probe_with_the_rest_of_the_box(fake):
    app, client = fake
    r = await client.post("/v1/chat/completions", json=PROBE)
    assert "".join(d.get("content", "") for d in deltas(r.content)) == "42}"
    assert (app.stats.requests, app.stats.streams, app.stats.probes) == (1, 0, 1)
    stats = (await client.get("/stats")).json()
    assert stats == {"requests": 1, "streams": 0, "probes": 1}


async def test_only_a_continued_assistant_turn_counts_as_a_probe(fake):
    app, client = fake
    await client.post("/v1/chat/completions", json={**PROBE, "continue_final_message": False})
    await client.post("/v1/chat/completions", json={**CHAT, "stream": True,
                                                    "continue_final_message": True})
    assert (app.stats.streams, app.stats.probes) == (2, 0)


async def test_fake_upstream_in_burst_mode_sends_the_same_bytes():
    stepped, burst = FakeUpstream(), FakeUpstream(step=False)
    bodies = []
    for app in (stepped, burst):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as c:
            bodies.append((await c.post("/v1/chat/completions", json={**CHAT, "stream": True})).content)
    assert bodies[0] == bodies[1]


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@pytest.fixture(params=["aiohttp", "dynasor"])
def servers(tmp_path: Path, request):
    """The fake upstream and the floor proxy (on either client) in front of it, as real processes."""
    up_port, floor_port = free_port(), free_port()
    up = Server("fake upstream", _python("dynasorctl.bench.fake_upstream", "--port", str(up_port)),
                up_port, None, tmp_path / "up.log")
    floor = Server("floor", _python("dynasorctl.bench.floor_proxy", "--upstream", up.url,
                                    "--port", str(floor_port), "--client", request.param),
                   floor_port, None, tmp_path / "floor.log")
    try:
        yield up.start(), floor.start("/stats")
    finally:
        floor.stop()
        up.stop()


def test_the_floor_proxy_relays_bodies_and_streams_byte_for_byte(servers):
    up, floor = servers
    with httpx.Client(timeout=10) as client:
        for body in (CHAT, {**CHAT, "stream": True}, PROBE):
            direct = client.post(up.url + "/v1/chat/completions", json=body)
            relayed = client.post(floor.url + "/v1/chat/completions", json=body)
            assert relayed.status_code == direct.status_code == 200
            assert relayed.content == direct.content
            assert relayed.headers["content-type"] == direct.headers["content-type"]
        missing = client.get(floor.url + "/nowhere")
    assert missing.status_code == 404
    assert json.loads(up.get("/stats")) == {"requests": 6, "streams": 2, "probes": 2}
    assert floor.cpu_seconds() > 0


def test_a_server_is_stopped_by_its_own_pid(servers):
    up, floor = servers
    floor.stop()
    assert floor.proc is not None and floor.proc.returncode is not None
    assert up.proc is not None and up.proc.poll() is None


def test_the_python_load_generator_drives_the_fake_upstream(servers):
    up, _ = servers
    result = load.run_python(up.url + "/v1/chat/completions", proxy_bench.request_body(True), 4, 1)
    assert result.requests > 0 and result.errors == 0
    assert 0 < result.p50_ms <= result.p99_ms


def test_wrk_posts_the_body_and_reports_through_the_lua_script(servers, tmp_path):
    assert shutil.which("wrk"), "wrk is not installed: `make test` installs it (scripts/bench-deps.sh)"
    up, _ = servers
    result = load.run_wrk(up.url + "/v1/chat/completions", proxy_bench.request_body(False), 2, 1,
                          None, tmp_path)
    assert result.requests > 0 and result.errors == 0
    stats = json.loads(up.get("/stats"))
    assert stats["requests"] >= result.requests and stats["streams"] == 0


def test_wrk_summary_line_is_parsed():
    line = ('{"requests":1200,"duration_us":2000000,"connect":0,"read":1,"write":0,"status":200,'
            '"timeout":2,"p50_us":150,"p99_us":900}')
    result = load.parse_wrk(line)
    assert (result.requests, result.errors) == (1000, 203)
    assert (result.p50_ms, result.p99_ms, result.rps) == (0.15, 0.9, 500.0)


def test_dynasor_counters_are_read_from_its_metrics():
    metrics = Metrics()
    metrics.probes.update({"ok": 3, "cancelled": 2})
    metrics.records_written = 7
    counters = proxy_bench.parse_counters(exposition(registry(metrics))[0].decode())
    assert counters == {"probes_ok": 3, "probes_cancelled": 2, "records_written": 7,
                        "records_dropped": 0}


def _bench() -> proxy_bench.Bench:
    bench = proxy_bench.Bench(5, 1, "wrk test", 1, 0, ["direct", "floor", "dynasor", "dynasor-probing"])
    rows = {  # setup: (p50, p99, capacity rps, stream rps, cpu s of the streaming run)
        "direct": (0.1, 0.3, 8000, 1000, 4.0),
        "floor": (0.4, 1.0, 2500, 720, 4.5),
        "dynasor": (0.5, 1.3, 2000, 900, 5.4),
        "dynasor-probing": (0.7, 2.0, 1900, 500, 5.0),
    }
    for key, (p50, p99, rps, srps, cpu) in rows.items():
        bench.cells += [
            proxy_bench.Cell(key, "latency", load.LoadResult(1000, 0, 5.0, p50, p99), 1.0),
            proxy_bench.Cell(key, "capacity", load.LoadResult(rps * 5, 0, 5.0, 9.0, 20.0), 4.0,
                             load_core_busy=0.99),
            proxy_bench.Cell(key, "streaming", load.LoadResult(srps * 5, 0, 5.0, 9.0, 20.0), cpu,
                             upstream={"streams": srps * 5, "probes": 40 if "probing" in key else 0},
                             proxy={"probes_ok": 30, "probes_cancelled": 10}),
        ]
    return bench


def test_figures_are_relative_to_direct():
    figs = proxy_bench.figures(_bench())
    assert figs["direct"].added_p50_ms is None and figs["direct"].stream_share == 1.0
    dyn = figs["dynasor"]
    assert dyn.added_p50_ms == pytest.approx(0.4)
    assert dyn.added_p99_ms == pytest.approx(1.0)
    assert dyn.stream_share == pytest.approx(0.9)
    assert dyn.floor_share == pytest.approx(1.25) and figs["floor"].floor_share == 1.0
    assert dyn.cpu_ms_per_stream == pytest.approx(1.2)
    assert dyn.capacity_load_bound and not dyn.stream_load_bound
    assert figs["dynasor-probing"].probe_requests == 40


def test_targets_say_met_and_missed():
    figs = proxy_bench.figures(_bench())
    met = {t.key: t.met for t in proxy_bench.targets(figs)}
    assert met == {"added_p50_ms": True, "stream_share": True, "floor_share": True,
                   "cpu_ms_per_stream": False}
    none = proxy_bench.targets({})
    assert all(t.met is None and t.measured is None for t in none)


def test_report_renders_and_serialises():
    bench = _bench()
    console = Console(record=True, width=100)
    console.print(report.render(bench))
    text = console.export_text()
    assert "dynasor" in text and "LiteLLM" in text and "40 probe requests" in text
    data = json.loads(json.dumps(report.to_json(bench)))
    assert data["setups"]["dynasor"]["figures"]["stream_share"] == pytest.approx(0.9)
    assert data["setups"]["dynasor-probing"]["cells"]["streaming"]["upstream"]["probes"] == 40
    assert [t["key"] for t in data["targets"]] == ["added_p50_ms", "stream_share", "floor_share",
                                                   "cpu_ms_per_stream"]


def test_repeated_runs_report_median_and_spread():
    runs = [_bench(), _bench(), _bench()]
    for run, rps in zip(runs, (600, 900, 700)):  # dynasor's streaming throughput moves
        cell = run.cell("dynasor", "streaming")
        cell.load = load.LoadResult(rps * 5, 0, 5.0, 9.0, 20.0)
    console = Console(record=True, width=160)
    console.print(report.spread(runs))
    text = console.export_text()
    assert "Over 3 runs" in text
    assert "70% [60% - 90%]" in text  # share of direct: median, lowest, highest
    console = Console(record=True, width=160)
    console.print(report.spread(runs[:2]))  # an even count: the middle two's mean
    assert "75% [60% - 90%]" in console.export_text()


def test_the_command_rejects_an_unknown_setup():
    app = typer.Typer()
    bench_command.register(app)
    result = CliRunner().invoke(app, ["bench", "proxy", "--setup", "nginx"])
    assert isinstance(result.exception, UserError)
    assert "unknown setup nginx" in str(result.exception)


def test_the_command_is_documented():
    app = typer.Typer()
    bench_command.register(app)
    result = CliRunner().invoke(app, ["bench", "proxy", "--help"])
    assert result.exit_code == 0
    for option in ("--seconds", "--warmup", "--json", "--load-generator", "--setup"):
        assert option in result.output
