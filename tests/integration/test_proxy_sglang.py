"""The proxy in front of a REAL SGLang server (PyPI sglang on CPU + SmolLM2-135M-Instruct).

Transparency is checked byte for byte against the same request sent directly, with what
SGLang varies per response masked: `id`, `created`, the `metadata` object it adds to
non-streamed bodies, and `cached_tokens` (the second of two equal requests hits SGLang's
prefix cache, so direct and proxied bodies report different counts).
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from proxy.app import create_app
from proxy.settings import Settings
from proxy.store.db import open_store
from proxy.store.models import ProbeRow, RequestRow
from tests.servers import serving

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


async def _both(
    sglang_url: str, proxy_url: str, path: str, body: dict
) -> tuple[httpx.Response, httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        direct = await client.post(sglang_url + path, json=body)
        via = await client.post(proxy_url + path, json=body)
    return direct, via


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
    direct, via = await _both(sglang_url, url, "/v1/chat/completions", body)
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
    direct, via = await _both(sglang_url, url, "/v1/chat/completions", body)
    assert masked(via.content) == masked(direct.content)
    assert via.content.endswith(b"data: [DONE]\n\n")
    assert b'"choices":[],"usage":' in via.content  # SGLang's usage-only last chunk
    await asyncio.sleep(1.0)  # the record is written off the request path
    with Session(engine) as s:
        req = s.scalars(select(RequestRow).where(RequestRow.stream.is_(True))).one()
        probes = s.scalars(select(ProbeRow).where(ProbeRow.request_id == req.id)).all()
    assert req.status_code == 200 and req.completion_tokens == 60 and req.probed
    # Probes continue the assistant turn (continue_final_message, no generation prompt).
    ok = [p for p in probes if p.status == "ok"]
    assert ok, f"no probe answered: {[(p.position, p.status) for p in probes]}"
    assert all(p.position % 16 == 0 for p in probes)
    assert all(0 < p.output_tokens <= 8 for p in ok)
    assert app.metrics.probe_tokens >= sum(p.output_tokens for p in ok)


async def test_upstream_errors_pass_through(sglang_url, proxy):
    url, _, _ = proxy
    bad = {"model": "smollm2", "messages": PROMPT, "max_tokens": -1}
    direct, via = await _both(sglang_url, url, "/v1/chat/completions", bad)
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
