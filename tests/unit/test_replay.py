"""The replay upstream: recorded traces served in vLLM's wire format, probes included."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from dynasorctl import traces
from dynasorctl.commands import replay as replay_command
from dynasorctl.errors import UserError
from dynasorctl.recordings import HESITATION_TAIL, split_pieces, token_position
from dynasorctl.replay import ReplayApp, create_replay_app, serve_replay
from dynasorctl.traces import CotTrace, ScProgram
from proxy.core.certaindex import DEFAULT_PROBE_SUFFIX, is_hesitant, probe_answer
from proxy.core.policy import ProbeObservation

DATA = Path(traces.__file__).parent / "data"


@pytest.fixture(scope="module")
def cot() -> list[CotTrace]:
    return traces.load_cot(DATA / "cot-sample.jsonl.gz")


@pytest.fixture(scope="module")
def sc() -> list[ScProgram]:
    return traces.load_sc(DATA / "sc-sample.jsonl.gz")


def client(app: ReplayApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replay")


def events(body: str) -> list[Any]:
    """The SSE data of a stream: JSON objects, then the literal "[DONE]"."""
    frames = [f for f in body.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


def ask(problem: str, **extra: Any) -> dict[str, Any]:
    return {"model": "any", "messages": [{"role": "user", "content": problem}], **extra}


def chat_probe(trace: CotTrace, chars: int, **extra: Any) -> dict[str, Any]:
    continued = {"role": "assistant", "content": trace.text[:chars] + DEFAULT_PROBE_SUFFIX}
    return {"messages": [{"role": "user", "content": trace.problem}, continued],
            "continue_final_message": True, "add_generation_prompt": False,
            "max_tokens": 20, **extra}


def boundary(trace: CotTrace, position: int) -> int:
    """Characters streamed after `position` chunks."""
    return len(trace.text) * position // trace.completion_tokens


# --- the main stream ------------------------------------------------------------------------


async def test_chat_stream_is_the_trace_one_piece_a_chunk(cot: list[CotTrace]) -> None:
    trace = cot[0]
    async with client(create_replay_app(cot)) as c:
        r = await c.post("/v1/chat/completions", json=ask(trace.problem, stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert chunks[-1] == "[DONE]"
    first, content = chunks[0], chunks[1:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(content) == trace.completion_tokens
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == trace.text
    assert {c["id"] for c in chunks[:-1]} == {first["id"]}
    assert first["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert all(c["model"] == trace.model for c in chunks[:-1])
    assert [c["choices"][0]["finish_reason"] for c in content[-2:]] == [None, trace.finish_reason]
    assert all(c["choices"][0]["logprobs"] is None for c in content)
    assert not any("usage" in c for c in chunks[:-1])


async def test_completion_stream_ends_with_usage_when_asked(cot: list[CotTrace]) -> None:
    trace = cot[1]
    body = {"prompt": f"Question: {trace.problem}\nAnswer:", "stream": True,
            "stream_options": {"include_usage": True}}
    async with client(create_replay_app(cot)) as c:
        r = await c.post("/v1/completions", json=body)
    chunks = events(r.text)
    *content, usage, done = chunks
    assert done == "[DONE]"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": trace.prompt_tokens,
                              "completion_tokens": trace.completion_tokens,
                              "total_tokens": trace.prompt_tokens + trace.completion_tokens}
    assert len(content) == trace.completion_tokens
    assert "".join(c["choices"][0]["text"] for c in content) == trace.text
    assert content[0]["id"].startswith("cmpl-") and content[0]["object"] == "text_completion"


async def test_whole_responses_carry_text_and_usage(cot: list[CotTrace]) -> None:
    trace = cot[2]
    async with client(create_replay_app(cot)) as c:
        chat = (await c.post("/v1/chat/completions", json=ask(trace.problem))).json()
        text = (await c.post("/v1/completions", json={"prompt": trace.problem})).json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": trace.text},
                                "logprobs": None, "finish_reason": "stop", "stop_reason": None}]
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == trace.text
    for body in (chat, text):
        assert body["usage"]["completion_tokens"] == trace.completion_tokens
        assert body["usage"]["total_tokens"] == trace.prompt_tokens + trace.completion_tokens


async def test_max_tokens_cuts_the_trace_with_finish_length(cot: list[CotTrace]) -> None:
    trace = cot[0]
    pieces = split_pieces(trace.text, trace.completion_tokens)
    async with client(create_replay_app(cot)) as c:
        streamed = events((await c.post("/v1/completions", json={
            "prompt": trace.problem, "stream": True, "max_tokens": 10})).text)[:-1]
        whole = (await c.post("/v1/chat/completions",
                              json=ask(trace.problem, max_completion_tokens=10))).json()
    assert "".join(c["choices"][0]["text"] for c in streamed) == "".join(pieces[:10])
    assert len(streamed) == 10 and streamed[-1]["choices"][0]["finish_reason"] == "length"
    assert whole["choices"][0]["message"]["content"] == "".join(pieces[:10])
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 10


async def test_model_then_seed_select_among_traces_of_one_problem(cot: list[CotTrace]) -> None:
    base = cot[0]
    other_model = replace(base, model="Qwen/Qwen3-8B", text="Qwen says 1.", completion_tokens=4)
    other_seed = replace(base, seed=43, text="Seed 43 says 2.", completion_tokens=5)
    app = create_replay_app([base, other_model, other_seed])

    async def said(**extra: Any) -> list[str]:
        body = (await c.post("/v1/chat/completions", json=ask(base.problem, **extra))).json()
        return [ch["message"]["content"] for ch in body["choices"]]

    async with client(app) as c:
        assert await said() == [base.text]
        assert await said(model="Qwen/Qwen3-8B") == [other_model.text]
        assert await said(seed=43) == [other_seed.text]
        assert await said(model="no-such-model", seed=7) == [base.text]
        # n > 1: the best match first, then the problem's other traces, cycling.
        assert await said(seed=43, n=4) == [other_seed.text, base.text, other_model.text,
                                            other_seed.text]


# --- self-consistency ------------------------------------------------------------------------


async def test_n_samples_of_a_program_stream_interleaved(sc: list[ScProgram]) -> None:
    program = sc[0]
    n = len(program.samples)
    async with client(create_replay_app(sc)) as c:
        r = await c.post("/v1/chat/completions", json=ask(program.problem, n=n, stream=True))
        whole = (await c.post("/v1/completions", json={"prompt": program.problem, "n": n})).json()
    chunks = events(r.text)[:-1]
    texts: dict[int, str] = {i: "" for i in range(n)}
    for chunk in chunks[n:]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"]["content"]
    assert [texts[i] for i in range(n)] == [s.text for s in program.samples]
    assert [c["choices"][0]["delta"]["role"] for c in chunks[:n]] == ["assistant"] * n
    assert [c["choices"][0]["index"] for c in chunks[n : 2 * n]] == list(range(n))
    assert [ch["text"] for ch in whole["choices"]] == [s.text for s in program.samples]
    assert whole["usage"]["completion_tokens"] == sum(s.completion_tokens for s in program.samples)


async def test_a_seed_picks_one_sample(sc: list[ScProgram]) -> None:
    program = sc[1]
    async with client(create_replay_app(sc)) as c:
        body = (await c.post("/v1/completions", json={"prompt": program.problem, "seed": 3})).json()
    assert body["choices"][0]["text"] == program.samples[3].text


# --- probes ----------------------------------------------------------------------------------


def test_token_position_inverts_the_split_exactly() -> None:
    # Short tokens (1.16 characters each): a plain round lands one short here.
    text_len, tokens = 113, 97
    assert any(round((text_len * k // tokens) * tokens / text_len) != k for k in range(tokens))
    for k in range(tokens + 1):
        assert token_position(text_len * k // tokens, text_len, tokens) == k
    assert token_position(1000, text_len, tokens) == tokens
    assert token_position(5, 0, 0) == 0


async def test_chat_probes_answer_what_was_recorded_there(cot: list[CotTrace]) -> None:
    trace = next(t for t in cot if len({p.answer for p in t.probes}) > 2)
    async with client(create_replay_app(cot)) as c:

        async def answer_at(chars: int) -> str:
            r = await c.post("/v1/chat/completions", json=chat_probe(trace, chars))
            return r.json()["choices"][0]["message"]["content"]

        for i, probe in enumerate(trace.probes):
            expected = f"{probe.answer or ''}}}"
            at = boundary(trace, probe.position)
            assert await answer_at(at) == expected
            # A character past the boundary still rounds to this probe's position.
            assert await answer_at(at + 1) == expected
            if i > 0:
                before = f"{trace.probes[i - 1].answer or ''}}}"
                assert await answer_at(at - 3) == before
        assert await answer_at(boundary(trace, trace.probes[0].position) - 5) == "}"


async def test_completion_probe_behind_a_chat_template(cot: list[CotTrace]) -> None:
    trace, probe = cot[3], cot[3].probes[4]
    template = f"<|User|>{trace.problem}<|Assistant|><think>\n"
    prompt = template + trace.text[: boundary(trace, probe.position)] + DEFAULT_PROBE_SUFFIX
    async with client(create_replay_app(cot)) as c:
        r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20,
                                                   "stream": True})
        plain = (await c.post("/v1/completions", json={"prompt": template})).json()
    chunks = events(r.text)[:-1]
    # a piece a token the probe decoded, as the model streamed them
    assert "".join(c["choices"][0]["text"] for c in chunks) == f"{probe.answer}}}"
    assert len(chunks) == min(probe.tokens, len(probe.answer) + 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # The template's own "<think>\n" is where generation starts, not a probe.
    assert plain["choices"][0]["text"] == trace.text


async def test_uncertain_probe_says_so_after_the_brace(cot: list[CotTrace]) -> None:
    trace = cot[0]
    doubt = ProbeObservation(position=128, answer="4490", hesitant=True, tokens=12)
    probes = [p if p.position != 128 else doubt for p in trace.probes]
    app = create_replay_app([replace(trace, probes=probes)])
    async with client(app) as c:
        body = (await c.post("/v1/chat/completions",
                             json=chat_probe(trace, boundary(trace, 128)))).json()
    output = body["choices"][0]["message"]["content"]
    assert output == "4490}" + HESITATION_TAIL
    assert probe_answer(output) == "4490" and is_hesitant(output)
    assert body["usage"]["completion_tokens"] == 12


async def test_probe_max_tokens_cuts_its_answer(cot: list[CotTrace]) -> None:
    trace = cot[0]
    probe = trace.probes[0]
    async with client(create_replay_app(cot)) as c:
        body = (await c.post("/v1/chat/completions", json=chat_probe(
            trace, boundary(trace, probe.position), max_tokens=2))).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2
    assert f"{probe.answer}}}".startswith(choice["message"]["content"])
    assert len(choice["message"]["content"]) < len(f"{probe.answer}}}")


# --- errors and the small endpoints ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/v1/chat/completions", ask("What is the airspeed of a swallow?"), 404, "NotFoundError"),
        ("/v1/completions", {"prompt": "nothing recorded"}, 404, "NotFoundError"),
        ("/v1/chat/completions", b"{not json", 400, "BadRequestError"),
        ("/v1/chat/completions", {"model": "m"}, 400, "BadRequestError"),
        ("/v1/completions", {"model": "m"}, 400, "BadRequestError"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "BadRequestError"),
        ("/v1/completions", {"prompt": "x", "n": 10**30}, 400, "BadRequestError"),  # it grew to 22 GB
        ("/v1/chat/completions", ask("What is 2 + 2?", n=129), 400, "BadRequestError"),
        ("/v2/nowhere", {}, 404, "NotFoundError"),
    ],
)
async def test_errors_are_openai_shaped(cot: list[CotTrace], path: str, body: Any, status: int,
                                        kind: str) -> None:
    async with client(create_replay_app(cot)) as c:
        if isinstance(body, bytes):
            r = await c.post(path, content=body)
        else:
            r = await c.post(path, json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == kind and error["code"] == status and error["message"]
    if status == 404 and path != "/v2/nowhere":
        assert "no recorded trace matches this prompt" in error["message"]
    if isinstance(body, dict) and "n" in body:
        assert error["message"].startswith("n: ")  # the field named


async def test_models_and_health(cot: list[CotTrace], sc: list[ScProgram]) -> None:
    async with client(create_replay_app(cot)) as c:
        models = (await c.get("/v1/models")).json()
        health = await c.get("/health")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == list(dict.fromkeys(t.model for t in cot))
    assert all(m["object"] == "model" for m in models["data"])
    assert health.status_code == 200
    async with client(create_replay_app(sc)) as c:
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == [sc[0].model]


async def test_stream_stops_when_the_client_hangs_up(cot: list[CotTrace]) -> None:
    trace = cot[0]
    request = json.dumps({"prompt": trace.problem, "stream": True}).encode()
    incoming: list[dict[str, Any]] = [
        {"type": "http.request", "body": request, "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # nothing more ever arrives
        raise AssertionError

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    await asyncio.wait_for(create_replay_app(cot)(scope, receive, send), timeout=5)
    assert sent[0]["status"] == 200
    assert 1 <= len(sent) - 1 < 10 < trace.completion_tokens


# --- the real server and the command ---------------------------------------------------------


async def test_served_over_tcp_at_the_given_rate(cot: list[CotTrace]) -> None:
    trace = cot[0]
    body = {"prompt": trace.problem, "stream": True, "max_tokens": 40}
    text, done = "", False
    async with (serve_replay(cot, tokens_per_second=200) as base_url,
                httpx.AsyncClient(base_url=base_url) as c):
        assert (await c.get("/health")).status_code == 200
        started = time.perf_counter()
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
        elapsed = time.perf_counter() - started
    assert done and text == "".join(split_pieces(trace.text, trace.completion_tokens)[:40])
    assert elapsed >= 0.15  # 40 tokens at 200 a second


def test_command_reports_a_missing_file_as_a_user_error(tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `replay` a subcommand
    replay_command.register(app)
    result = CliRunner().invoke(app, ["replay", "--traces", str(tmp_path / "missing.jsonl.gz")])
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError)
    message = str(result.exception)
    assert "missing.jsonl.gz" in message and "\n" not in message  # cli.main prints it as is


def test_command_reports_a_taken_port_as_a_user_error() -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    replay_command.register(app)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["replay", "--port", str(port)])
    assert isinstance(result.exception, UserError)
    assert f"127.0.0.1:{port}" in str(result.exception) and "\n" not in str(result.exception)
