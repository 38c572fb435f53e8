"""Structured logs: `--log-format json` is one object a line, with the request's id."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from proxy.logs import REQUEST_ID, handler
from proxy.upstream.base import UpstreamError
from tests.fakes import SSE, Call, FakeResponse, chat_stream
from tests.unit.test_proxy import chat_body, make


def test_a_json_line_has_time_level_request_id_event_and_the_callers_fields():
    out = io.StringIO()
    log = logging.getLogger("test.logs.json")
    log.addHandler(handler("json", out))
    log.propagate = False
    try:
        token = REQUEST_ID.set("abc123")
        log.warning("probe at %d tokens failed", 64, extra={"upstream": "http://u"})
        REQUEST_ID.reset(token)
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("outside any request")
    finally:
        log.handlers.clear()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "warning" and first["logger"] == "test.logs.json"
    assert first["request_id"] == "abc123"
    assert first["event"] == "probe at 64 tokens failed"
    assert first["upstream"] == "http://u"
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["request_id"] is None and second["level"] == "error"
    assert "ValueError: bad" in second["exception"]


async def test_a_requests_probe_failure_is_logged_with_its_request_id():
    main = FakeResponse(200, list(SSE), chat_stream(["t "] * 70), delay_s=0.001)

    def handler_(call: Call):
        if call.json().get("continue_final_message"):
            return UpstreamError("connect", "upstream refused the probe")
        return main

    out = io.StringIO()
    proxy_log = logging.getLogger("proxy")
    proxy_log.addHandler(handler("json", out))
    try:
        app, upstream, sink, client = make(handler_)
        async with app:
            await client.post("/v1/chat/completions", json=chat_body(stream=True))
    finally:
        proxy_log.handlers.clear()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [line for line in lines if "probe at 64 tokens failed" in line["event"]]
    assert len(failed) == 1
    assert failed[0]["request_id"] == sink.records[0].request["id"]  # logged from the probe's task


class Upstream(BaseHTTPRequestHandler):
    """Streams a chat answer a chunk every 20 ms; refuses probes (so the proxy logs a warning)."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if body.get("continue_final_message"):
            self.send_response(500)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(200)
        for k, v in SSE:
            self.send_header(k.decode(), v.decode())
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        for chunk in chat_stream(["t "] * 90):
            self.wfile.write(chunk)
            self.wfile.flush()
            time.sleep(0.02)

    def log_message(self, *args) -> None:
        pass


def test_observe_with_json_logs_writes_only_json_lines(tmp_path):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNASOR_")}
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:  # a file, not a pipe: a straggling child cannot hold it open
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynasorctl", "observe", "--upstream",
             f"http://127.0.0.1:{upstream.server_port}", "--port", str(port),
             "--db", f"sqlite:///{tmp_path / 'd.db'}", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert proc.poll() is None
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(stream=True), timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down gracefully
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left
        upstream.shutdown()
        thread.join()
        upstream.server_close()
    text = log.read_text()
    not_json = [line for line in text.splitlines() if not _is_json(line)]
    assert not_json == [], text  # every line is JSON
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["event"].startswith("dynasor observing http://127.0.0.1:")
    failed = [line for line in lines if "probe at 64 tokens failed" in line["event"]]
    assert len(failed) == 1 and failed[0]["level"] == "warning"
    assert len(failed[0]["request_id"]) == 32


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
