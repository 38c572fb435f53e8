"""Non-streamed requests in shadow and enforce: watched as an upstream stream, answered whole."""

from __future__ import annotations

import json

from proxy.pipeline.sse import SseReader
from tests.fakes import SSE, FakeResponse, chat_stream, sse
from tests.unit.test_enforce import policy_file, scripted  # noqa: F401 - the fixture
from tests.unit.test_proxy import chat_body, make


def main_call(upstream):
    return next(c for c in upstream.calls if not c.json().get("continue_final_message")
                and c.json().get("max_tokens") != 1)


async def test_enforce_stops_a_non_streamed_request_and_answers_whole(policy_file):  # noqa: F811
    # slow enough that the probes keep up even on a loaded machine; the stop cuts it short
    main, handler = scripted(["<think>"] + ["step "] * 400, ["7", "42", "42", "42"], delay_s=0.01)
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(), headers={"authorization": "Bearer k"})
    (count,) = [c for c in upstream.calls if c.json().get("max_tokens") == 1]
    assert count.header(b"authorization") == b"Bearer k"  # the prompt count carries the client's key
    sent = main_call(upstream).json()
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert main.closed and main.sent < len(main.parts)  # the generation was cut short
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-dynasor-mode"] == "enforce"
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"] == "c1" and body["model"] == "m"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("<think>step step ")
    assert choice["message"]["content"].endswith("\n</think>\n\n**Final Answer**\n\\boxed{42}")
    assert body["dynasor"]["stopped"] and body["dynasor"]["answer"] == "42"
    generated = body["dynasor"]["generated_tokens"]
    assert 192 <= generated < 401
    assert body["usage"] == {"prompt_tokens": 17, "completion_tokens": generated,
                             "total_tokens": 17 + generated}
    rec = sink.records[0].request
    assert (rec["mode"], rec["enforced"], rec["stream"], rec["decision_answer"]) == (
        "enforce", True, False, "42")


async def test_shadow_answers_a_non_streamed_request_whole_and_unchanged(policy_file):  # noqa: F811
    pieces = ["x "] * 300
    main, handler = scripted(pieces, ["5", "5", "5", "5"])
    app, upstream, sink, client = make(handler, mode="shadow", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
    assert main.sent == len(main.parts)  # generated to the end
    body = r.json()
    assert "x-dynasor-mode" not in r.headers and "dynasor" not in body
    (choice,) = body["choices"]
    assert choice["message"]["content"] == "".join(pieces)
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 300
    rec = sink.records[0].request
    assert (rec["mode"], rec["enforced"], rec["decision_token"], rec["decision_answer"]) == (
        "shadow", False, 128, "5")


async def test_whole_response_keeps_the_reasoning_field_and_upstream_usage(policy_file):  # noqa: F811
    events = [json.loads(d) for d in SseReader().feed(b"".join(chat_stream(["a", "b"], reasoning=True)))
              if d != b"[DONE]"]
    events.insert(-1, {"id": "c1", "object": "chat.completion.chunk", "model": "m",
                       "choices": [{"index": 0, "delta": {"content": "done"}, "finish_reason": None}]})
    events.append({"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}})
    main = FakeResponse(200, list(SSE), sse(events))
    app, upstream, sink, client = make(lambda call: main, mode="shadow", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
    message = r.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("ab", "done")
    assert r.json()["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


async def test_completions_are_answered_whole_too(policy_file):  # noqa: F811
    events = [{"id": "t1", "object": "text_completion", "model": "m",
               "choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in ["4", "2"]]
    events.append({"id": "t1", "object": "text_completion", "model": "m",
                   "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    main = FakeResponse(200, list(SSE), sse(events))
    app, upstream, sink, client = make(lambda call: main, mode="shadow", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "6*7="})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "42", "logprobs": None, "finish_reason": "length"}]


async def test_an_upstream_break_mid_generation_is_a_clear_502(policy_file):  # noqa: F811
    main = FakeResponse(200, list(SSE), chat_stream(["x "] * 50), fail_after=10)
    app, upstream, sink, client = make(lambda call: main, mode="shadow", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 502
    assert "broke off" in r.json()["error"]["message"]
    assert sink.records[0].request["status_code"] == 502


async def test_upstream_errors_and_unassembled_requests_are_relayed_as_sent(policy_file):  # noqa: F811
    error = b'{"error": {"message": "bad model", "code": 404}}'
    app, upstream, sink, client = make(lambda call: FakeResponse(404, parts=[error]), mode="enforce",
                                       policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
        assert (r.status_code, r.content) == (404, error)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        r = await client.post("/v1/chat/completions", json=chat_body(tools=tools))
    assert (r.status_code, r.content) == (404, error)
    assert upstream.calls[-1].json().get("stream") is None  # forwarded untouched
    assert (sink.records[-1].request["probed"], sink.records[-1].request["mode"]) == (False, "observe")
