"""No request can stop the recording: what clients and upstreams send, against a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from proxy.pipeline.app import ProxyApp, create_app
from proxy.settings import Settings
from proxy.store.db import open_store
from proxy.store.models import RequestRow
from proxy.store.recorder import Record, write_records
from proxy.upstream.base import UpstreamError
from tests.fakes import JSON, FakeResponse, ScriptedUpstream


async def call(app: ProxyApp, body: bytes, headers: list[tuple[bytes, bytes]] = (),
               path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    """One request straight through ASGI: any header bytes, no client library in the way."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *headers]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def until(condition, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "not recorded in time"
        await asyncio.sleep(0.01)


def stored(engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(RequestRow))


def store_app(tmp_path, handler, write=None) -> tuple[ProxyApp, Any]:
    engine = open_store(f"sqlite:///{tmp_path}/rec.db")
    app = create_app(Settings(upstream_url="http://scripted.upstream"), ScriptedUpstream(handler),
                     write or partial(write_records, engine))
    return app, engine


def unreachable(call):
    return UpstreamError("connect", "upstream unreachable")


# Each reached the proxy (an upstream 502 is enough) and, before, stopped every later write.
POISON = {
    "n of 2^63": b'{"model": "m", "n": 9223372036854775808}',
    "model a lone surrogate": b'{"model": "\\ud800", "messages": []}',
    "model an object": b'{"model": {"a": 1}}',
    "model a list": b'{"model": [1, 2]}',
    "a NUL in the model": b'{"model": "a\\u0000b"}',
}


@pytest.mark.parametrize("body", POISON.values(), ids=POISON.keys())
async def test_an_unstorable_request_is_stored_sanitised_and_recording_goes_on(tmp_path, body):
    app, engine = store_app(tmp_path, unreachable)
    async with app:
        app.recorder.flush_interval_s = 0.01
        assert (await call(app, body))[0] == 502
        assert (await call(app, b'{"model": "canary"}'))[0] == 502
        await until(lambda: app.metrics.records_written == 2)
        health = app.health()
    assert health["status"] == "ok" and health["store"]["rejected"] == 0
    assert health["store"]["writer"] == {"running": True, "restarts": 0}
    with Session(engine) as s:
        rows = s.scalars(select(RequestRow).order_by(RequestRow.created_at)).all()
    assert [r.status_code for r in rows] == [502, 502] and rows[1].model == "canary"
    first = rows[0]
    assert first.n <= 2**31 - 1 and (first.model is None or "\x00" not in first.model)


async def test_long_and_foreign_values_fit_their_columns(tmp_path):
    app, engine = store_app(tmp_path, lambda call: FakeResponse(200, list(JSON), [json.dumps(
        {"model": {"not": "text"}, "usage": {"prompt_tokens": 2**40, "completion_tokens": "many"},
         "choices": []}).encode()]))
    async with app:
        app.recorder.flush_interval_s = 0.01
        await call(app, b'{"model": "m"}', [(b"x-dynasor-program", b"p" * 1000)])
        await until(lambda: app.metrics.records_written == 1)
    with Session(engine) as s:
        row = s.scalars(select(RequestRow)).one()
    assert row.program_id == "p" * 200  # cut to the column
    assert row.model == "m"  # the upstream's is not a name: the request's is kept
    assert row.prompt_tokens == 2**31 - 1 and row.completion_tokens is None  # "many" is no count
    assert app.metrics.records_sanitised == 1


async def test_a_record_the_store_refuses_is_dropped_alone_counted_and_logged_once(tmp_path, caplog):
    engine = open_store(f"sqlite:///{tmp_path}/rec.db")
    attempts = []

    def write(batch: list[Record]) -> None:  # a store with a rule the records cannot know
        attempts.append(len(batch))
        if any(r.request["model"] == "refused" for r in batch):
            raise IntegrityError("INSERT", {}, Exception("CHECK constraint failed"))
        write_records(engine, batch)

    app, _ = store_app(tmp_path, unreachable, write)
    async with app:
        app.recorder.flush_interval_s = 0.3  # one batch of all five
        for model in ("a", "b", "refused", "c", "d"):
            await call(app, json.dumps({"model": model}).encode())
        await until(lambda: app.metrics.records_written == 4)
        for model in ("e", "f"):  # and the writer goes on
            await call(app, json.dumps({"model": model}).encode())
        await until(lambda: app.metrics.records_written == 6)
        health = app.health()
    assert attempts[0] == 5 and len(attempts) <= 1 + 2 * 3 + 1  # halved down to the refused one
    assert stored(engine) == 6 and app.metrics.records_rejected == 1
    assert health["status"] == "degraded" and health["store"]["rejected"] == 1
    refused = [r for r in caplog.records if "refused the record" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR


async def test_a_writer_that_dies_is_restarted_with_its_batch_and_health_says_so(tmp_path):
    app, engine = store_app(tmp_path, unreachable)
    async with app:
        recorder = app.recorder
        recorder.flush_interval_s = 0.01
        drain = recorder._drain

        def broken(into: list[Record], limit: int) -> None:  # a bug in the writer itself, once
            recorder._drain = drain
            raise RuntimeError("bug")

        recorder._drain = broken
        await call(app, b'{"model": "first"}')
        await until(lambda: app.metrics.writer_restarts == 1)
        await call(app, b'{"model": "second"}')
        await until(lambda: app.metrics.records_written == 2)
        health = app.health()
    assert stored(engine) == 2  # the batch it held when it died was written after the restart
    assert health["status"] == "degraded"
    assert health["store"]["writer"] == {"running": True, "restarts": 1}
    assert "writer stopped" in health["store"]["last_error"]


# -- any JSON body, any headers ----------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=()), max_size=12)  # lone surrogates included
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)
_fields = st.sampled_from(["model", "n", "stream", "messages", "prompt", "stream_options", "max_tokens",
                           "seed", "tools", "logprobs", "temperature"])
_bodies = st.dictionaries(_fields | _text, _json, max_size=8)
_names = st.sampled_from([b"x-dynasor-program", b"x-dynasor", b"authorization", b"content-type"]) | st.binary(
    min_size=1, max_size=12).map(bytes.lower)
_headers = st.lists(st.tuples(_names, st.binary(max_size=300)), max_size=4)
# what the upstream answers: unreachable, an error, or a body with anything in its fields
_replies = st.one_of(
    st.just(None),
    st.builds(lambda model, usage, choices: json.dumps(
        {"model": model, "usage": usage, "choices": choices}).encode(), _json, _json, _json),
)


def test_records_flow_after_any_json_body_and_headers(tmp_path):
    """Property: whatever a client sends and the upstream answers, the request is recorded and
    the next one is too; nothing is rejected, dropped, or stops the writer."""
    replies: list[bytes | None] = [None]

    def handler(call):
        reply = replies[0]
        return unreachable(call) if reply is None else FakeResponse(200, list(JSON), [reply])

    app, engine = store_app(tmp_path, handler)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(app.startup())
    app.recorder.flush_interval_s = 0.005
    expected = 0

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=_bodies, headers=_headers, reply=_replies)
    def one(body: dict, headers: list[tuple[bytes, bytes]], reply: bytes | None) -> None:
        nonlocal expected
        replies[0] = reply
        opt = next((v for k, v in headers if k == b"x-dynasor"), None)
        expected += opt != b"off"  # an opted-out request is relayed, not recorded

        async def go() -> None:
            status, _ = await call(app, json.dumps(body).encode(), headers)
            assert status in (200, 502)
            await until(lambda: app.metrics.records_written == expected and not app._finalizing)
            assert app.health()["status"] == "ok"

        loop.run_until_complete(go())

    try:
        one()
    finally:
        loop.run_until_complete(app.shutdown())
        loop.close()
    assert stored(engine) == expected
    assert (app.metrics.records_rejected, app.metrics.records_dropped, app.metrics.writer_restarts) == (0, 0, 0)


async def test_a_value_the_driver_cannot_bind_is_the_records_fault_not_the_stores(tmp_path):
    """Only the store being unreachable keeps a batch for retry; a record the driver cannot take
    is dropped alone (retried, it would hold up every record behind it)."""
    engine = open_store(f"sqlite:///{tmp_path}/rec.db")

    def write(batch: list[Record]) -> None:
        for r in batch:  # what got past the fitting, as the DB-API sees it
            if r.request["model"] == "unbindable":
                r.request["error"] = object()
        write_records(engine, batch)

    app, _ = store_app(tmp_path, unreachable, write)
    async with app:
        app.recorder.flush_interval_s = 0.01
        for model in ("unbindable", "fine"):
            await call(app, json.dumps({"model": model}).encode())
        await until(lambda: app.metrics.records_written == 1 and app.metrics.records_rejected == 1)
    assert stored(engine) == 1 and app.metrics.write_errors == 0


async def test_closing_on_a_store_that_stays_down_is_bounded_and_quiet(tmp_path, caplog):
    """Closing retried with no pause: ~10,000 log lines in the 10 s a shutdown waits."""
    def down(batch: list[Record]) -> None:
        raise OperationalError("INSERT", {}, Exception("unable to open database file"))

    app, _ = store_app(tmp_path, unreachable, down)
    await app.startup()
    await call(app, b'{"model": "m"}')
    loop = asyncio.get_running_loop()
    started = loop.time()
    await app.recorder.close(timeout_s=3)
    assert loop.time() - started < 10
    assert app.metrics.records_dropped == 1  # lost, and counted as such
    assert len([r for r in caplog.records if "store write failed" in r.getMessage()]) < 20
    await app.shutdown()
