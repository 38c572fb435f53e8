"""Self-consistency in shadow and enforce: samples generated one stream each, stopped by certaindex."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.control.plan import Control
from proxy.core.policy import ScPolicy
from proxy.metrics import Metrics
from proxy.pipeline.samples import ProgramRun
from proxy.settings import Settings
from tests.fakes import SSE, Call, FakeResponse, chat_stream, probe_reply
from tests.unit.test_enforce import events
from tests.unit.test_proxy import chat_body, make

SC_POLICY = """
version = 1
kind = "sc"
model = "*"

[sc]
threshold = 1.0
min_samples = 2
max_samples = 8
"""


@pytest.fixture
def sc_policy(tmp_path):
    path = tmp_path / "sc.toml"
    path.write_text(SC_POLICY)
    return str(path)


def samples(script: list[tuple[str, int, float]], probes: list[str] | None = None):
    """Each sample call gets the next (answer, tokens, seconds a token) of `script`."""
    made: list[FakeResponse] = []
    answers = iter(probes or [])

    def handler(call: Call):
        body = call.json()
        if body.get("continue_final_message"):
            return probe_reply(next(answers) + "}")
        assert body["n"] == 1 and body["stream"] is True
        answer, tokens, delay = script[len(made)]
        pieces = ["x "] * (tokens - 1) + [f"\\boxed{{{answer}}}"]
        made.append(FakeResponse(200, list(SSE), chat_stream(pieces), delay_s=delay))
        return made[-1]

    return made, handler


def sample_calls(upstream):
    return [c.json() for c in upstream.calls if not c.json().get("continue_final_message")]


async def test_enforce_never_starts_samples_it_does_not_need(sc_policy):
    made, handler = samples([("42", 10, 0.001)] * 8)
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(n=8, seed=5))
    assert [c["seed"] for c in sample_calls(upstream)] == [5, 6]  # two agreeing samples suffice
    assert r.status_code == 200 and r.headers["x-dynasor-mode"] == "enforce"
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["message"]["content"].endswith("\\boxed{42}") for c in body["choices"])
    ext = body["dynasor"]
    assert (ext["samples_requested"], ext["samples_used"], ext["samples_not_started"],
            ext["samples_aborted"], ext["answer"], ext["stopped"]) == (8, 2, 6, 0, "42", True)
    assert body["usage"]["completion_tokens"] == ext["generated_tokens"] == 20
    rec = sink.records[0].request
    assert (rec["mode"], rec["enforced"], rec["n"], rec["decision_token"], rec["decision_answer"],
            rec["final_answer"]) == ("enforce", True, 8, 2, "42", "42")
    assert [s["answer"] for s in sink.records[0].samples] == ["42", "42"]


async def test_enforce_aborts_samples_whose_answer_is_not_needed(sc_policy):
    # Two quick samples agree; the third, slow one is cut short (its upstream request closed).
    made, handler = samples([("7", 40, 0.001), ("7", 40, 0.001), ("9", 2000, 0.001)])
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy, sc_parallel=3)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(n=3))
    slow = made[2]
    assert slow.closed and slow.sent < len(slow.parts)
    body = r.json()
    ext = body["dynasor"]
    assert (ext["samples_used"], ext["samples_aborted"], ext["samples_not_started"]) == (2, 1, 0)
    assert 80 < ext["generated_tokens"] < 80 + 2000  # the aborted sample's tokens count
    assert body["usage"]["completion_tokens"] == ext["generated_tokens"]
    assert len(body["choices"]) == 2


async def test_answers_are_read_in_the_order_samples_started_as_calibrate_replays_them(sc_policy):
    # Samples 1 and 2 agree first, but sample 0 is read first: its answer differs, no stop.
    made, handler = samples([("5", 60, 0.002), ("7", 5, 0.001), ("7", 5, 0.001)])
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy, sc_parallel=3)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(n=3))
    ext = r.json()["dynasor"]
    assert (ext["samples_used"], ext["samples_aborted"], ext["stopped"], ext["answer"]) == (3, 0, False, "7")
    assert made[0].sent == len(made[0].parts)


async def test_enforce_keeps_sampling_while_answers_disagree(sc_policy):
    made, handler = samples([("1", 5, 0.001), ("2", 5, 0.001), ("3", 5, 0.001)])
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(n=3))
    ext = r.json()["dynasor"]
    assert (ext["samples_used"], ext["stopped"], ext["reason"]) == (3, False, "every sample")
    assert sink.records[0].request["enforced"] is False


async def test_shadow_runs_every_sample_and_records_the_decision(sc_policy):
    made, handler = samples([("5", 6, 0.001), ("5", 6, 0.002), ("6", 6, 0.004), ("6", 6, 0.006)])
    app, upstream, sink, client = make(handler, mode="shadow", policy_file=sc_policy)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(n=4))
    assert all(m.sent == len(m.parts) for m in made) and len(made) == 4
    body = r.json()
    assert "dynasor" not in body and "x-dynasor-mode" not in r.headers
    assert len(body["choices"]) == 4 and body["usage"]["completion_tokens"] == 24
    rec = sink.records[0].request
    assert (rec["mode"], rec["enforced"], rec["decision_token"], rec["decision_answer"]) == (
        "shadow", False, 2, "5")
    assert len(sink.records[0].samples) == 4


async def test_streaming_client_gets_each_used_sample_reindexed_then_usage(sc_policy):
    made, handler = samples([("3", 4, 0.001)] * 4)
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(
            n=4, stream=True, stream_options={"include_usage": True}))
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.content.endswith(b"data: [DONE]\n\n")
    evs = events(r.content)
    assert {e["id"] for e in evs} == {"c1"}
    per_index: dict[int, str] = {}
    for e in evs:
        for c in e["choices"]:
            per_index[c["index"]] = per_index.get(c["index"], "") + (c["delta"].get("content") or "")
    assert sorted(per_index) == [0, 1] and all(t.endswith("\\boxed{3}") for t in per_index.values())
    last = evs[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert last["dynasor"]["samples_used"] == 2


async def test_answers_read_by_a_probe_at_check_tokens(tmp_path):
    policy = tmp_path / "check.toml"
    policy.write_text(SC_POLICY.replace("min_samples = 2", "min_samples = 2\ncheck_tokens = 64"))
    # Long samples; probes at 64 tokens say 8 twice: both run to the end, the rest never start.
    made, handler = samples([("8", 200, 0.001)] * 4, probes=["8", "8"])
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=str(policy))
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(n=4))
    assert len(upstream.probe_calls()) == 2 and len(made) == 2
    assert all(m.sent == len(m.parts) for m in made)
    ext = r.json()["dynasor"]
    assert (ext["samples_used"], ext["samples_not_started"], ext["answer"]) == (2, 2, "8")
    rec = sink.records[0]
    assert (rec.request["probed"], rec.request["probe_count"]) == (True, 2)
    assert [(p["choice_index"], p["position"], p["answer"]) for p in rec.probes] == [(0, 64, "8"), (1, 64, "8")]


async def test_a_failed_sample_fails_the_request_as_the_upstream_said(sc_policy):
    error = b'{"error": {"message": "out of memory", "code": 500}}'
    calls = []

    def handler(call: Call):
        calls.append(call)
        if len(calls) == 2:
            return FakeResponse(500, parts=[error])
        return FakeResponse(200, list(SSE), chat_stream(["x "] * 300), delay_s=0.002)

    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(n=4))
    assert (r.status_code, r.content) == (500, error)
    assert upstream.responses[0].closed  # the other sample was aborted
    assert sink.records[0].request["status_code"] == 500


def test_a_self_consistency_policy_governs_only_requests_of_several_samples(sc_policy):
    control = Control(Settings(mode="enforce", policy_file=sc_policy), Metrics())
    single, several = control.plan("m", None, "k", None, 1), control.plan("m", None, "k", None, 4)
    assert (single.mode, single.policy, single.sc) == ("observe", None, None)
    assert several.mode == "enforce" and several.sc is not None and several.policy is None


def test_sample_requests_carry_one_sample_each(sc_policy):
    body = chat_body(n=3, best_of=3, stream_options={"continuous_usage_stats": True})
    run = ProgramRun(None, None, None, "chat", "/v1/chat/completions", body, [], [],  # type: ignore[arg-type]
                     ScPolicy(), True, 2)
    sent = json.loads(run._sample_body(1))
    assert (sent["n"], "best_of" in sent, sent["stream"]) == (1, False, True)
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


# --- programs tagged by header: one request a sample -------------------------------------------


def tagged(script: list[tuple[str, int, float]]):
    """Main requests get the next (answer, tokens, seconds a token); prompt counts get 17."""
    made: list[FakeResponse] = []

    def handler(call: Call):
        body = call.json()
        if body.get("max_tokens") == 1 and body.get("stream") is False:
            usage = {"prompt_tokens": 17, "completion_tokens": 1, "total_tokens": 18}
            return FakeResponse(200, parts=[json.dumps({"choices": [], "usage": usage}).encode()])
        answer, tokens, delay = script[len(made)]
        pieces = ["x "] * (tokens - 1) + [f"\\boxed{{{answer}}}"]
        made.append(FakeResponse(200, list(SSE), chat_stream(pieces), delay_s=delay))
        return made[-1]

    return made, handler


async def settled(app) -> None:
    """Wait until every finished request has been recorded (and its program decided)."""
    while app._finalizing:
        await asyncio.wait(set(app._finalizing))


async def test_a_decided_tagged_program_answers_later_samples_without_generating(sc_policy):
    made, handler = tagged([("42", 5, 0.001)] * 3)
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy)
    tag = {"x-dynasor-program": "p1"}
    async with app:
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=chat_body(stream=True), headers=tag)
            assert b"\\boxed{42}" in r.content and "dynasor" not in r.text
            await settled(app)
        r = await client.post("/v1/chat/completions", json=chat_body(), headers=tag)
        s = await client.post("/v1/chat/completions", json=chat_body(stream=True), headers=tag)
        await settled(app)
    assert len(made) == 2  # the third and fourth samples were never generated
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "**Final Answer**\n\\boxed{42}"
    assert body["choices"][0]["finish_reason"] == "stop" and r.headers["x-dynasor-mode"] == "enforce"
    assert body["dynasor"] == {"stopped": True, "program_verdict": True, "samples_read": 2, "answer": "42",
                               "generated_tokens": 0, "reason": "program decided: certaindex 1.00"}
    assert body["usage"] == {"prompt_tokens": 17, "completion_tokens": 0, "total_tokens": 17}
    assert s.content.endswith(b"data: [DONE]\n\n") and b'"program_verdict": true' in s.content
    records = [rec.request for rec in sink.records]
    assert [r["decision_token"] for r in records] == [None, 2, 2, 2]
    assert [r["enforced"] for r in records] == [False, False, True, True]
    assert sum(len(rec.samples) for rec in sink.records) == 2  # verdicts add no answers


async def test_a_tagged_sample_in_flight_is_cut_when_its_program_is_decided(sc_policy):
    made, handler = tagged([("9", 3000, 0.001), ("42", 5, 0.001), ("42", 5, 0.001)])
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=sc_policy)
    tag = {"x-dynasor-program": "p2"}
    async with app:
        slow = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(stream=True), headers=tag))
        while not made:
            await asyncio.sleep(0.001)
        for _ in range(2):
            await client.post("/v1/chat/completions", json=chat_body(stream=True), headers=tag)
            await settled(app)
        r = await slow
    assert made[0].closed and made[0].sent < len(made[0].parts)
    assert r.content.endswith(b"data: [DONE]\n\n")
    evs = events(r.content)
    text = "".join(c["delta"].get("content") or "" for e in evs for c in e["choices"])
    assert text.startswith("x x ") and text.endswith("\n\n**Final Answer**\n\\boxed{42}")
    ext = next(e["dynasor"] for e in evs if "dynasor" in e)
    assert ext["program_verdict"] and ext["samples_read"] == 2 and 0 < ext["generated_tokens"] < 3000


async def test_shadow_records_where_a_tagged_program_would_have_stopped(sc_policy):
    made, handler = tagged([("7", 5, 0.001)] * 3)
    app, upstream, sink, client = make(handler, mode="shadow", policy_file=sc_policy)
    async with app:
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=chat_body(stream=True),
                                  headers={"x-dynasor-program": "p3"})
            assert r.content == b"".join(made[-1].parts)  # unchanged
            await settled(app)
    assert len(made) == 3
    assert [rec.request["decision_token"] for rec in sink.records] == [None, 2, None]
    assert [rec.request["decision_answer"] for rec in sink.records] == [None, "7", None]


async def test_an_unexpected_failure_of_a_check_probe_does_not_leave_the_request_waiting(tmp_path):
    policy = tmp_path / "check.toml"
    policy.write_text(SC_POLICY.replace("min_samples = 2", "min_samples = 2\ncheck_tokens = 64"))
    made, main = samples([("8", 100, 0.001)] * 3)

    def handler(call: Call):
        if call.json().get("continue_final_message"):
            return RuntimeError("a bug in the probe path")  # not an upstream error
        return main(call)

    app, upstream, sink, client = make(handler, mode="enforce", policy_file=str(policy))
    async with app:
        r = await asyncio.wait_for(client.post("/v1/chat/completions", json=chat_body(n=3)), 10)
    assert r.status_code == 200  # the unread answers count as none, as in replay
    assert r.json()["dynasor"]["samples_requested"] == 3
