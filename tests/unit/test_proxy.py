"""The proxy in process against a scripted upstream: transparency and exact edge cases."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from proxy.pipeline.app import create_app
from proxy.settings import Settings
from proxy.store.recorder import Record
from proxy.upstream.base import UpstreamError
from tests.fakes import JSON, SSE, Call, FakeResponse, ScriptedUpstream, chat_stream, probe_reply


class Sink:
    """A store stand-in: collects written records; can fail the first `failures` writes."""

    def __init__(self, failures: int = 0) -> None:
        self.records: list[Record] = []
        self.failures = failures

    def __call__(self, batch):
        if self.failures:
            self.failures -= 1
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        self.records.extend(batch)


def make(handler, **settings):
    upstream = ScriptedUpstream(handler)
    sink = Sink(settings.pop("failures", 0))
    app = create_app(Settings(upstream_url="http://scripted.upstream", **settings), upstream, sink)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")
    return app, upstream, sink, client


def chat_body(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "What is 6 * 7?"}], **extra}


async def test_non_streaming_body_status_and_headers_are_the_upstream_bytes():
    raw = b'{"id":"x",  "choices":[{"index":0,"message":{"role":"assistant","content":"so \\\\boxed{42}"},' \
          b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":5}, "odd": 1}'
    headers = [*JSON, (b"x-upstream", b"yes"), (b"connection", b"keep-alive"),
               (b"content-length", str(len(raw)).encode())]
    app, upstream, sink, client = make(lambda call: FakeResponse(201, headers, [raw[:10], raw[10:]]))
    async with app:
        r = await client.post("/v1/chat/completions", content=json.dumps(chat_body()).encode())
    assert r.status_code == 201
    assert r.content == raw
    assert r.headers["x-upstream"] == "yes"
    assert "keep-alive" not in r.headers.get("connection", "")
    assert r.headers["content-length"] == str(len(raw))  # the body is relayed as is
    (rec,) = sink.records
    assert rec.request["final_answer"] == "42"
    assert rec.request["completion_tokens"] == 5
    assert rec.request["prompt_tokens"] == 9
    assert rec.request["probed"] is False  # non-streaming requests are not probed


async def test_request_bytes_reach_the_upstream_untouched_with_unknown_fields():
    body = json.dumps(chat_body(n=1, seed=7, logprobs=True, top_logprobs=2, stop=["x"],
                                tools=[{"type": "function", "function": {"name": "f"}}],
                                stream_options={"include_usage": True}, weird_field={"a": [1]})).encode()
    app, upstream, sink, client = make(lambda call: FakeResponse(200, list(JSON), [b"{}"]))
    async with app:
        await client.post("/v1/chat/completions?x=1", content=body,
                          headers={"authorization": "Bearer client-key", "x-custom": "1"})
    call = upstream.calls[0]
    assert call.body == body
    assert call.path == "/v1/chat/completions?x=1"
    assert call.header(b"authorization") == b"Bearer client-key"
    assert call.header(b"x-custom") == b"1"


async def test_streamed_bytes_are_relayed_exactly_and_probes_recorded():
    pieces = [f"t{i} " for i in range(140)]
    main = FakeResponse(200, list(SSE), chat_stream(pieces), delay_s=0.001)

    def handler(call: Call):
        if call.json().get("continue_final_message"):
            # the second probe hesitates in the same chunk that closes the brace
            return probe_reply(["4", "2", "} hmm, wait"] if len(upstream.probe_calls()) == 2 else "42}")
        return main

    app, upstream, sink, client = make(handler)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.content == b"".join(main.parts)
    probes = upstream.probe_calls()
    assert len(probes) == 2  # at 64 and 128 tokens
    sent = probes[0].json()
    assert sent["add_generation_prompt"] is False and sent["stream"] is True
    assert sent["messages"][-1]["role"] == "assistant"
    assert sent["messages"][-1]["content"].startswith("t0 t1 ")
    assert sent["messages"][-1]["content"].endswith("\\boxed{")
    assert sent["max_tokens"] == 20 and sent["temperature"] == 0.6 and sent["top_p"] == 0.95
    (rec,) = sink.records
    assert [(p["position"], p["answer"], p["hesitant"], p["status"]) for p in rec.probes] == [
        (64, "42", False, "ok"), (128, "42", True, "ok")]
    assert rec.request["probe_count"] == 2
    assert rec.request["completion_tokens"] == 140
    assert rec.probes[0]["output_tokens"] == 3  # '4', '2', '}': the probe stops at the brace


async def test_probe_rate_zero_sends_no_probes():
    main = FakeResponse(200, list(SSE), chat_stream(["x"] * 200))
    app, upstream, sink, client = make(lambda call: main, probe_rate=0.0)
    async with app:
        await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert len(upstream.calls) == 1
    assert sink.records[0].request["probed"] is False


async def test_completions_probe_appends_text_to_the_prompt():
    events = [{"choices": [{"index": 0, "text": "a", "finish_reason": None}]}] * 64
    events.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    main = FakeResponse(200, list(SSE), [f"data: {json.dumps(e)}\n\n".encode() for e in events], delay_s=0.002)

    def handler(call: Call):
        if call.json().get("prompt", "").endswith("\\boxed{"):
            events = [{"choices": [{"index": 0, "text": "7}", "finish_reason": None}]}]
            return FakeResponse(200, list(SSE), [f"data: {json.dumps(e)}\n\n".encode() for e in events])
        return main

    app, upstream, sink, client = make(handler)
    async with app:
        await client.post("/v1/completions", json={"model": "m", "prompt": "Q:", "stream": True})
    probe = upstream.calls[1].json()
    assert probe["prompt"].startswith("Q:" + "a" * 64)
    assert sink.records[0].probes[0]["answer"] == "7"


async def test_upstream_error_status_and_body_reach_the_client_as_sent():
    body = b'{"object":"error","message":"bad model","type":"BadRequestError","code":400}'
    app, upstream, sink, client = make(lambda call: FakeResponse(400, list(JSON), [body]))
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
    assert (r.status_code, r.content) == (400, body)
    assert sink.records[0].request["error"] == "bad model"  # SGLang's flat error shape read too


@pytest.mark.parametrize(("kind", "status"), [("connect", 502), ("timeout", 504)])
async def test_unreachable_or_slow_upstream_gets_an_openai_error(kind, status):
    app, upstream, sink, client = make(lambda call: UpstreamError(kind, f"upstream {kind} failed"))
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == status
    assert r.json()["error"]["message"] == f"upstream {kind} failed"
    assert sink.records[0].request["status_code"] == status


async def test_mid_stream_upstream_break_ends_the_stream_well_formed():
    main = FakeResponse(200, list(SSE), chat_stream(["a", "b", "c"]), fail_after=2)
    app, upstream, sink, client = make(lambda call: main)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.content.startswith(b"".join(main.parts[:2]))
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert b'"error"' in r.content
    assert "broke off" in sink.records[0].request["error"]
    assert app.metrics.upstream_errors["broken"] == 1


async def test_malformed_client_json_is_forwarded_and_the_upstream_answers():
    reply = b'{"error":{"message":"invalid JSON","type":"BadRequestError","code":400}}'
    app, upstream, sink, client = make(lambda call: FakeResponse(400, list(JSON), [reply]))
    async with app:
        r = await client.post("/v1/chat/completions", content=b"{not json")
    assert (r.status_code, r.content) == (400, reply)
    assert upstream.calls[0].body == b"{not json"


async def test_client_disconnect_closes_the_upstream_and_is_recorded():
    main = FakeResponse(200, list(SSE), chat_stream(["x"] * 500), delay_s=0.002)
    app, upstream, sink, _ = make(lambda call: main, probe_rate=0.0)
    body = json.dumps(chat_body(stream=True)).encode()
    gone = asyncio.Event()
    sent: list[dict] = []

    async def receive():
        if not sent:
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if len(sent) == 10:
            gone.set()

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    async with app:
        await app(scope, receive, send)
    assert main.closed
    assert main.sent < 100  # the relay stopped soon after the client went
    assert sink.records[0].request["status_code"] == 499


async def test_store_locked_keeps_serving_then_writes_everything():
    main = FakeResponse(200, list(JSON), [b'{"choices":[]}'])
    app, upstream, sink, client = make(lambda call: main, failures=2)
    async with app:
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=chat_body())
            assert r.status_code == 200
        for _ in range(600):  # until the first write has failed (a loaded machine is slow)
            if app.metrics.write_errors:
                break
            await asyncio.sleep(0.05)
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
    assert health["store"]["write_errors"] >= 1
    assert "database is locked" in (health["store"]["last_error"] or "")
    assert "dynasor_store_write_errors_total" in metrics
    assert len(sink.records) == 3  # nothing lost: retried, then flushed on shutdown


async def test_full_record_queue_drops_and_counts():
    main = FakeResponse(200, list(JSON), [b'{"choices":[]}'])
    app, upstream, sink, client = make(lambda call: main, record_queue_size=1, failures=1000)
    async with app:
        for _ in range(5):
            await client.post("/v1/chat/completions", json=chat_body())
        await asyncio.sleep(0.1)
        assert app.metrics.records_dropped >= 1
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded" and health["store"]["dropped"] >= 1
        sink.failures = 0


def _boxed_choice(i: int, answer: str) -> dict:
    return {"index": i, "message": {"role": "assistant", "content": f"so \\boxed{{{answer}}}"},
            "finish_reason": "stop"}


async def test_n_samples_get_entropy_certaindex_after_each():
    answers = ["2", "2", "\\frac{4}{2}", "3"]
    raw = json.dumps({"choices": [_boxed_choice(i, a) for i, a in enumerate(answers)],
                      "usage": {"completion_tokens": 40}}).encode()
    app, upstream, sink, client = make(lambda call: FakeResponse(200, list(JSON), [raw]))
    async with app:
        await client.post("/v1/chat/completions", json=chat_body(n=4))
    samples = sink.records[0].samples
    assert [s["answer_group"] for s in samples] == [0, 0, 0, 1]  # 4/2 is 2 (math-aware)
    expected = [0.0, 1.0, 1.0, 1 - (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / math.log(4)]
    assert [s["certaindex"] for s in samples] == pytest.approx(expected)


async def test_program_header_groups_requests():
    replies = iter(["7", "7", "8"])

    def handler(call):
        body = json.dumps({"choices": [_boxed_choice(0, next(replies))]}).encode()
        return FakeResponse(200, list(JSON), [body])

    app, upstream, sink, client = make(handler)
    async with app:
        for _ in range(3):
            await client.post("/v1/chat/completions", json=chat_body(), headers={"x-dynasor-program": "p1"})
            await asyncio.sleep(0.05)
    samples = [s for r in sink.records for s in r.samples]
    assert [s["sample_index"] for s in samples] == [0, 1, 2]
    assert {s["program_id"] for s in samples} == {"p1"}
    assert samples[1]["certaindex"] == pytest.approx(1.0)
    assert samples[2]["certaindex"] < 1.0


async def test_other_paths_pass_through_and_health_metrics_are_ours():
    app, upstream, sink, client = make(lambda call: FakeResponse(200, list(JSON), [b'{"data":[]}']))
    async with app:
        models = await client.get("/v1/models")
        other = await client.post("/v1/embeddings", content=b"x")
        health = await client.get("/health")
        metrics = await client.get("/metrics")
    assert models.content == b'{"data":[]}' and other.status_code == 200
    assert [c.path for c in upstream.calls] == ["/v1/models", "/v1/embeddings"]
    assert health.json()["status"] == "ok"
    assert 'dynasor_requests_total{code="200",endpoint="/v1/models"} 1.0' in metrics.text
    assert sink.records == []  # only completions are recorded


async def test_sglang_wire_format_reasoning_and_empty_usage_chunk():
    """SGLang's shape (ENGINE.md): reasoning_content deltas, matched_stop, a last `choices: []` chunk."""
    events = [{"id": "s", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": None,
                                                  "reasoning_content": "think "}, "finish_reason": None,
                            "matched_stop": None}]} for _ in range(64)]
    events.append({"id": "s", "choices": [{"index": 0, "delta": {"content": "so \\boxed{9}",
                                                                 "reasoning_content": None},
                                           "finish_reason": "stop", "matched_stop": 2}]})
    events.append({"id": "s", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 65,
                                                       "reasoning_tokens": 64}})
    main = FakeResponse(200, list(SSE), [f"data: {json.dumps(e)}\n\n".encode() for e in events]
                        + [b"data: [DONE]\n\n"], delay_s=0.001)

    def handler(call: Call):
        return probe_reply("9}") if call.json().get("continue_final_message") else main

    app, upstream, sink, client = make(handler)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True,
                                                                   stream_options={"include_usage": True}))
    assert r.content == b"".join(main.parts)
    prefix = upstream.probe_calls()[0].json()["messages"][-1]["content"]
    assert prefix.startswith("<think>\nthink think ")  # the split-off reasoning is put back
    rec = sink.records[0].request
    assert (rec["final_answer"], rec["completion_tokens"], rec["prompt_tokens"]) == ("9", 65, 5)
    assert sink.records[0].probes[0]["answer"] == "9"
