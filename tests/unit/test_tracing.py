"""OpenTelemetry traces: a span per observed request, its probes and decision as children."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dynasorctl.stack import free_port
from proxy.pipeline.app import create_app
from proxy.settings import Settings
from proxy.tracing import Tracing, TracingUnavailable, from_settings, traces_url
from tests.fakes import SSE, Call, FakeResponse, ScriptedUpstream, chat_stream, probe_reply
from tests.unit.test_enforce import POLICY, scripted
from tests.unit.test_proxy import Sink, chat_body

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def traced(handler, **settings):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = Sink()
    app = create_app(Settings(upstream_url="http://scripted.upstream", **settings),
                     ScriptedUpstream(handler), sink, Tracing(provider))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")
    return app, exporter, sink, client


def by_name(spans, name):
    return [s for s in spans if s.name == name]


async def test_tracing_is_off_by_default():
    assert create_app(Settings(), ScriptedUpstream(lambda call: FakeResponse()), Sink()).tracing is None


async def test_a_probed_stream_is_one_span_with_its_probes_as_children():
    main = FakeResponse(200, list(SSE), chat_stream([f"t{i} " for i in range(140)]), delay_s=0.001)

    def handler(call: Call):
        return probe_reply("42}") if call.json().get("continue_final_message") else main

    app, exporter, sink, client = traced(handler)
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body(stream=True),
                              headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert r.status_code == 200
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, "POST /v1/chat/completions")
    probes = by_name(spans, "dynasor.probe")
    assert len(spans) == 1 + len(probes)  # observe mode: no policy, so no decision span
    assert request.kind is SpanKind.SERVER
    assert f"{request.context.trace_id:032x}" == TRACE_ID  # joined the client's trace
    assert f"{request.parent.span_id:016x}" == PARENT_ID
    attrs = request.attributes
    assert attrs["dynasor.request_id"] == sink.records[0].request["id"]
    assert attrs["http.response.status_code"] == 200 and attrs["dynasor.mode"] == "observe"
    assert attrs["gen_ai.usage.output_tokens"] == 140 and attrs["dynasor.probe_count"] == 2
    assert [(p.attributes["dynasor.position"], p.attributes["dynasor.answer"]) for p in probes] == [
        (64, "42"), (128, "42")]
    for p in probes:
        assert p.parent.span_id == request.context.span_id
        assert request.start_time <= p.start_time <= p.end_time <= request.end_time
        assert p.attributes["dynasor.status"] == "ok" and 0 <= p.attributes["dynasor.certaindex"] <= 1
    assert request.end_time - request.start_time >= 140 * 1_000_000 * 0.5  # it streamed for real


@pytest.mark.parametrize("answers, stop", [(["5", "5", "5", "5"], True), (["1", "2", "3"], False)])
async def test_the_policy_decision_is_a_child_span(tmp_path, answers, stop):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    main, handler = scripted(["x "] * (300 if stop else 200), answers)
    app, exporter, sink, client = traced(handler, mode="shadow", policy_file=str(policy))
    async with app:
        await client.post("/v1/chat/completions", json=chat_body(stream=True))
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, "POST /v1/chat/completions")
    (decision,) = by_name(spans, "dynasor.decision")
    assert decision.parent.span_id == request.context.span_id
    assert decision.attributes["dynasor.stop"] is stop
    assert decision.attributes["dynasor.mode"] == "shadow"
    if stop:
        assert (decision.attributes["dynasor.position"], decision.attributes["dynasor.answer"]) == (128, "5")
        at_128 = next(p for p in by_name(spans, "dynasor.probe") if p.attributes["dynasor.position"] == 128)
        assert decision.start_time == at_128.end_time  # decided when that probe came back
    else:
        assert "dynasor.position" not in decision.attributes
        assert decision.start_time == request.end_time


async def test_an_upstream_failure_marks_the_span_as_an_error():
    app, exporter, sink, client = traced(lambda call: FakeResponse(503, parts=[b'{"error":"busy"}']))
    async with app:
        r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503
    (request,) = exporter.get_finished_spans()
    assert request.status.status_code is StatusCode.ERROR
    assert request.attributes["http.response.status_code"] == 503


class Collector(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP receiver: keeps the decoded export requests."""

    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        Collector.received.append(request)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


async def test_spans_reach_an_otlp_http_collector():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        main = FakeResponse(200, list(SSE), chat_stream(["a", "b"]))
        app = create_app(Settings(upstream_url="http://scripted.upstream", probe_rate=0,
                                  otlp_endpoint=f"http://127.0.0.1:{server.server_port}"),
                         ScriptedUpstream(lambda call: main), Sink())
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")
        async with app:  # shutdown flushes the batch
            await client.post("/v1/chat/completions", json=chat_body(stream=True))
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    spans = [s for r in Collector.received for rs in r.resource_spans for ss in rs.scope_spans
             for s in ss.spans]
    assert [s.name for s in spans] == ["POST /v1/chat/completions"]
    resource = {a.key: a.value.string_value for r in Collector.received
                for rs in r.resource_spans for a in rs.resource.attributes}
    assert resource["service.name"] == "dynasor"


def test_otlp_endpoint_without_the_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(TracingUnavailable, match="otel extra"):
        from_settings(Settings(otlp_endpoint="http://127.0.0.1:4318"))


def test_traces_url_takes_a_collector_base_or_the_full_path():
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_with_tracing_off_the_proxy_does_not_even_import_opentelemetry():
    code = ("import sys; from proxy.pipeline.app import create_app; from proxy.settings import Settings; "
            "app = create_app(Settings()); "
            "print(app.tracing, sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True, env={k: v for k, v in os.environ.items() if not k.startswith("DYNASOR_")})
    assert out.stdout.strip() == "None []"


def test_the_cli_says_which_extra_to_install(tmp_path):
    """Run as an operator would, without the OpenTelemetry packages importable."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['opentelemetry.exporter.otlp.proto.http.trace_exporter'] = None\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNASOR_")}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "dynasorctl", "observe", "--otlp-endpoint", "http://127.0.0.1:4318",
                          "--db", f"sqlite:///{tmp_path / 'd.db'}", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 2
    assert "otel extra" in out.stderr and "pip install opentelemetry-sdk" in out.stderr
    assert "Traceback" not in out.stderr
