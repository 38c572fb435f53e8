"""Credentials in the upstream URL reach the upstream and nothing else: not a client's error,
not /health, not the store, not the log."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from proxy.pipeline.app import create_app
from proxy.settings import Settings
from proxy.store.db import open_store
from proxy.store.models import RequestRow
from proxy.store.recorder import write_records
from proxy.upstream.url import parse_upstream
from tests.servers import free_port


@pytest.mark.parametrize(
    ("given", "base", "shown", "auth", "notice"),
    [
        ("http://h:8000", "http://h:8000", "http://h:8000", None, False),
        ("http://h:8000/v1", "http://h:8000", "http://h:8000", None, True),
        ("https://gw/vllm/v1/", "https://gw/vllm", "https://gw/vllm", None, True),
        ("http://u:p@h/v1", "http://h", "http://u:***@h", "Basic dTpw", True),
        ("http://tok@h", "http://h", "http://***@h", "Basic dG9rOg==", False),
        ("http://[::1]:9/x", "http://[::1]:9/x", "http://[::1]:9/x", None, False),
    ],
)
def test_the_upstream_url_as_used_and_shown(given, base, shown, auth, notice):
    url = parse_upstream(given)
    assert (url.base, url.shown, url.authorization, url.notice is not None) == (base, shown, auth, notice)


@pytest.mark.parametrize("bad", ["ftp://h", "h:8000", "http://h:port", "http://u:p@h:x", "http:///v1"])
def test_a_bad_upstream_url_is_refused_without_repeating_it(bad):
    with pytest.raises(ValueError) as err:
        parse_upstream(bad)
    assert "p@" not in str(err.value)


def test_credentials_and_an_api_key_together_are_refused():
    with pytest.raises(ValueError, match="use one"):
        Settings(upstream_url="http://u:p@h", upstream_api_key="k")


async def test_an_unreachable_upstream_with_credentials_leaks_them_nowhere(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    engine = open_store(f"sqlite:///{tmp_path}/s.db")
    settings = Settings(upstream_url=f"http://ops:s3cret@127.0.0.1:{free_port()}", probe_rate=0)
    app = create_app(settings, write=partial(write_records, engine))
    async with app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as client:
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        health = (await client.get("/health")).text
        while app.metrics.records_written < 1:
            await asyncio.sleep(0.05)
    assert r.status_code == 502 and "ops:***@127.0.0.1" in r.text
    with Session(engine) as s:
        row = s.scalars(select(RequestRow)).one()
    seen = [r.text, health, row.upstream, row.error, caplog.text]
    assert not [text for text in seen if "s3cret" in text]
    assert row.upstream.startswith("http://ops:***@")
