"""Shadow and enforce: the policy's decision recorded, or carried out on the stream."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from proxy.core.treatment import choose, in_rollout
from proxy.pipeline.enforce import answer_text
from tests.fakes import SSE, Call, FakeResponse, chat_stream, probe_reply
from tests.unit.test_proxy import chat_body, make

POLICY = """
version = 1
kind = "cot"
model = "*"

[cot]
interval = 64
window = 2
"""


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return str(path)


def scripted(pieces: list[str], answers: list[str], delay_s: float = 0.002):
    """A main stream of `pieces`, probes answered in turn from `answers`, prompt-size requests."""
    main = FakeResponse(200, list(SSE), chat_stream(pieces), delay_s=delay_s)
    replies = iter(answers)

    def handler(call: Call):
        body = call.json()
        if body.get("continue_final_message"):
            return probe_reply(next(replies) + "}")
        if body.get("max_tokens") == 1 and body.get("stream") is False:
            usage = {"prompt_tokens": 17, "completion_tokens": 1, "total_tokens": 18}
            return FakeResponse(200, parts=[json.dumps({"choices": [], "usage": usage}).encode()])
        return main

    return main, handler


def events(raw: bytes) -> list[dict]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(json.loads(block[6:]))
    return out


async def test_enforce_stops_the_stream_aborts_upstream_and_ends_well_formed(policy_file):
    # slow enough that the probes keep up even on a loaded machine; the stop cuts it short
    main, handler = scripted(["<think>"] + ["step "] * 400, ["7", "42", "42", "42"], delay_s=0.01)
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions",
                              json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.headers["x-dynasor-mode"] == "enforce"
    assert main.closed and main.sent < len(main.parts)  # the upstream request was cut short
    assert r.content.endswith(b"data: [DONE]\n\n")
    evs = events(r.content)
    text = "".join(c["delta"].get("content") or "" for e in evs for c in e["choices"])
    assert text.endswith("\n</think>\n\n**Final Answer**\n\\boxed{42}")  # think closed, answer written
    finish = [c["finish_reason"] for e in evs for c in e["choices"] if c["finish_reason"]]
    assert finish == ["stop"]
    ext = next(e["dynasor"] for e in evs if "dynasor" in e)
    assert ext["stopped"] and ext["stop_token"] == 192 and ext["answer"] == "42"
    usage = evs[-1]["usage"]
    assert usage["prompt_tokens"] == 17 and usage["completion_tokens"] == ext["generated_tokens"]
    assert 192 <= usage["completion_tokens"] < 401
    assert {e["id"] for e in evs} == {"c1"}  # the proxy's chunks look like the upstream's
    rec = sink.records[0].request
    assert (rec["mode"], rec["enforced"], rec["decision_token"], rec["decision_answer"]) == (
        "enforce", True, 192, "42")
    assert app.metrics.enforced_stops == 1


async def test_shadow_records_the_decision_and_changes_nothing(policy_file):
    main, handler = scripted(["x "] * 300, ["5", "5", "5", "5"])
    app, upstream, sink, client = make(handler, mode="shadow", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.content == b"".join(main.parts)
    assert "x-dynasor-mode" not in r.headers
    rec = sink.records[0].request
    assert (rec["mode"], rec["enforced"], rec["decision_token"], rec["decision_answer"]) == (
        "shadow", False, 128, "5")
    assert app.metrics.shadow_stops == 1


async def test_enforce_does_not_stop_while_answers_disagree(policy_file):
    main, handler = scripted(["x "] * 200, ["1", "2", "3"])
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.content == b"".join(main.parts)
    assert sink.records[0].request["enforced"] is False
    assert sink.records[0].request["decision_token"] is None


async def test_opt_out_header_wins(policy_file):
    main, handler = scripted(["x "] * 200, ["5"] * 5)
    app, upstream, sink, client = make(handler, mode="enforce", policy_file=policy_file)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True),
                              headers={"x-dynasor": "off"})
    assert r.content == b"".join(main.parts)
    assert len(upstream.calls) == 1 and sink.records == []  # no probe, nothing recorded


async def test_opt_in_only_where_the_operator_allows_it(policy_file):
    for allow, mode in ((False, "shadow"), (True, "enforce")):
        main, handler = scripted(["x "] * 200, ["5"] * 5)
        app, upstream, sink, client = make(handler, mode="enforce", policy_file=policy_file,
                                           enforce_percent=0, allow_opt_in=allow)
        async with app:
            await client.post("/v1/chat/completions", json=chat_body(stream=True),
                              headers={"x-dynasor": "enforce"})
        assert sink.records[0].request["mode"] == mode


SALT = b"server-side secret"


def test_rollout_share_is_about_the_percentage_and_sticky():
    keys = [f"program-{i}" for i in range(20_000)]
    chosen = [k for k in keys if in_rollout(k, 10, SALT)]
    assert 0.09 < len(chosen) / len(keys) < 0.11
    assert chosen == [k for k in keys if in_rollout(k, 10, SALT)]  # the same programs every time
    assert set(chosen) <= {k for k in keys if in_rollout(k, 20, SALT)}  # widening keeps them in
    assert not any(in_rollout(k, 0, SALT) for k in keys[:100])
    assert all(in_rollout(k, 100, SALT) for k in keys[:100])


def test_a_client_cannot_compute_its_group_from_the_program_name():
    """The split once hashed only the client's X-Dynasor-Program: anyone could pick a name that
    lands in enforce (or avoids it). Keyed with the server's secret, what the client can compute
    (the bare hash, or the hash under another secret) says nothing about its group."""
    keys = [f"program-{i}" for i in range(4_000)]

    def bare(key: str) -> bool:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 * 100 < 50

    server = [in_rollout(k, 50, SALT) for k in keys]
    for guess in ([bare(k) for k in keys], [in_rollout(k, 50, b"a guess") for k in keys]):
        agree = sum(a == b for a, b in zip(server, guess, strict=True)) / len(keys)
        assert 0.45 < agree < 0.55  # a coin toss


@pytest.mark.parametrize(
    ("mode", "percent", "opt", "allow", "expected"),
    [("observe", 100, None, False, "observe"), ("shadow", 100, None, False, "shadow"),
     ("enforce", 100, "off", False, "off"), ("observe", 100, "off", False, "off"),
     ("enforce", 0, None, False, "shadow"), ("enforce", 0, "enforce", True, "enforce"),
     ("enforce", 0, "enforce", False, "shadow"), ("shadow", 100, "enforce", True, "shadow")],
)
def test_choose(mode, percent, opt, allow, expected):
    assert choose(mode, percent, "k", opt, allow, SALT) == expected


def test_answer_text_closes_only_an_open_think_block():
    template = "**Final Answer**\n\\boxed{{{answer}}}"
    assert answer_text("3", template, "<think>\nhm") == "\n</think>\n\n**Final Answer**\n\\boxed{3}"
    assert answer_text("3", template, "<think>a</think> b") == "\n\n**Final Answer**\n\\boxed{3}"


async def test_proxies_on_one_store_share_the_rollout_secret_and_keep_it(tmp_path):
    """Every proxy on a store must put a program in the same group, across restarts too; the
    secret is the store's, made by the first proxy and never shown to a client."""
    from proxy.control.plan import Control
    from proxy.metrics import Metrics
    from proxy.settings import Settings
    from proxy.store.db import open_store

    url = f"sqlite:///{tmp_path}/shared.db"
    keys = [f"p{i}" for i in range(200)]

    async def groups() -> list[str]:
        control = Control(Settings(mode="enforce", policy_file=str(_policy(tmp_path)), enforce_percent=50),
                          Metrics())
        await control.start(open_store(url))
        await control.stop()
        return [control.plan("m", None, k, None).mode for k in keys]

    first, second, again = await asyncio.gather(groups(), groups(), groups())
    assert first == second == again and 50 < first.count("enforce") < 150
    assert first == await groups()  # a restarted proxy: the same groups


def _policy(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    return path
