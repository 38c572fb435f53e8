"""The proxy in front of a REAL SGLang server (PyPI sglang on CPU + SmolLM2-135M-Instruct).

Transparency is checked byte for byte against the same request sent directly, with what
SGLang varies per response masked: `id`, `created`, the `metadata` object it adds to
non-streamed bodies, and `cached_tokens` (the second of two equal requests hits SGLang's
prefix cache, so direct and proxied bodies report different counts).
"""

from __future__ import annotations

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

VOLATILE = re.compile(
    rb'"(id|created|cached_tokens)":\s*("[^"]*"|\d+)'
    rb'|"(metadata)":\s*\{(?:[^{}]|\{[^{}]*\})*\}'  # an object holding flat objects
)
PROMPT = [{"role": "user", "content": "Count from 1 to 30, separated by spaces."}]


def masked(raw: bytes) -> bytes:
    return VOLATILE.sub(lambda m: b'"%s":"*"' % (m[1] or m[3]), raw)


@pytest.fixture
async def proxy(sglang_url, tmp_path):
    """The proxy on a real port in front of the real server; yields (url, app, engine)."""
    db_url = f"sqlite:///{tmp_path}/obs.db"
    settings = Settings(
        upstream_url=sglang_url, db_url=db_url, probe_interval=16, probe_max_tokens=8
    )
    app = create_app(settings)
    async with serving(app) as url:
        yield url, app, open_store(db_url)



def test_masking_covers_sglang_volatile_fields():
    raw = (
        b'{"id":"ab12","created":1795736996,"usage":{"prompt_tokens_details":{"cached_tokens":42}},'
        b'"metadata":{"weight_version":"default","weight_versions":[{"version":"default","start":0,"end":40}]}}'
    )
    assert (
        masked(raw)
        == b'{"id":"*","created":"*","usage":{"prompt_tokens_details":{"cached_tokens":"*"}},"metadata":"*"}'
    )


async def test_non_streamed_chat_is_byte_identical(sglang_url, proxy):
    url, _, _ = proxy
    body = {"model": "smollm2", "messages": PROMPT, "temperature": 0, "seed": 1, "max_tokens": 40}
    direct, via = await both(sglang_url, url, "/v1/chat/completions", body)
    assert via.status_code == direct.status_code == 200
    assert masked(via.content) == masked(direct.content)
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert "matched_stop" in via.json()["choices"][0]  # SGLang's own fields survive


async def test_streamed_chat_with_usage_is_byte_identical_and_probed(sglang_url, proxy):
    url, app, engine = proxy
    body = {
        "model": "smollm2",
        "messages": PROMPT,
        "temperature": 0,
        "seed": 1,
        "max_tokens": 60,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    direct, via = await both(sglang_url, url, "/v1/chat/completions", body)
    assert masked(via.content) == masked(direct.content)
    assert via.content.endswith(b"data: [DONE]\n\n")
    assert b'"choices":[],"usage":' in via.content  # SGLang's usage-only last chunk
    await assert_probed(app, engine, tokens=60, interval=16, max_tokens=8)


async def test_upstream_errors_pass_through(sglang_url, proxy):
    url, _, _ = proxy
    bad = {"model": "smollm2", "messages": PROMPT, "max_tokens": -1}
    direct, via = await both(sglang_url, url, "/v1/chat/completions", bad)
    assert via.status_code == direct.status_code == 400
    assert via.content == direct.content
    body = json.loads(via.content)
    assert body["object"] == "error" and "error" not in body  # SGLang's flat shape, untouched


async def test_models_pass_through(sglang_url, proxy):
    url, _, _ = proxy
    async with httpx.AsyncClient() as client:
        direct = await client.get(sglang_url + "/v1/models")
        via = await client.get(url + "/v1/models")
    assert via.status_code == direct.status_code == 200
    assert masked(via.content) == masked(direct.content)
    assert [m["id"] for m in via.json()["data"]] == ["smollm2"]


async def test_enforced_stream_is_stopped_and_ends_well_formed(sglang_url, tmp_path):
    await enforced_stream(sglang_url, tmp_path)


async def test_enforced_non_streamed_request_is_stopped_and_answered_whole(sglang_url, tmp_path):
    await enforced_whole(sglang_url, tmp_path)


async def test_enforced_self_consistency_aborts_unneeded_samples(sglang_url, tmp_path):
    await enforced_samples(sglang_url, tmp_path)


async def test_probes_and_trials_record_the_confidence_the_engine_gives(sglang_url, tmp_path):
    await confidence_recorded(sglang_url, tmp_path)


async def test_an_enforced_trial_stops_the_real_engine_stream(sglang_url, tmp_path):
    await enforced_trial(sglang_url, tmp_path)
