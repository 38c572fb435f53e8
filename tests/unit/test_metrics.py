"""`/metrics` through prometheus-client: declared once, checked by promtool, names kept."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics, exposition, registry, specs
from proxy.pipeline.app import create_app
from proxy.settings import Settings
from tests.fakes import SSE, FakeResponse, ScriptedUpstream, chat_stream

ROOT = Path(__file__).resolve().parents[2]

# The names dashboards and alerts already use: they must not change.
NAMES = {
    "dynasor_requests_total", "dynasor_upstream_errors_total", "dynasor_probes_total",
    "dynasor_probe_tokens_total", "dynasor_main_tokens_total", "dynasor_policy_stops_total",
    "dynasor_guardrail_rollbacks_total", "dynasor_active_streams", "dynasor_records_written_total",
    "dynasor_records_dropped_total", "dynasor_records_sanitised_total",
    "dynasor_records_rejected_total", "dynasor_store_writer_restarts_total",
    "dynasor_store_write_errors_total",
    "dynasor_record_queue_depth", "dynasor_request_duration_seconds", "dynasor_certaindex",
}


def promtool() -> str:
    """Debian's promtool, installed by scripts/test-deps.sh (`make test` runs it)."""
    found = shutil.which("promtool") or str(ROOT / ".cache" / "bin" / "promtool")
    assert Path(found).exists(), "promtool missing: run scripts/test-deps.sh"
    return found


def busy_metrics() -> Metrics:
    """Every family with samples, labelled ones with several."""
    m = Metrics()
    m.requests[("/v1/chat/completions", 200)] += 3
    m.requests[("/v1/models", 502)] += 1
    m.upstream_errors["timeout"] += 2
    m.probes.update({"ok": 5, "cancelled": 1})
    m.probe_tokens, m.main_tokens, m.shadow_stops, m.enforced_stops = 40, 900, 2, 1
    m.records_written, m.active_streams = 4, 2
    m.record_queue_depth = lambda: 7
    for value in (0.05, 0.5, 1.0):
        m.observe_certaindex("cot", value)
    m.observe_certaindex("sc", 0.9)
    m.duration.observe(0.3)
    m.duration.observe(120.0)  # past the last bucket: only +Inf
    return m


def families(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_every_field_is_declared_once_with_help():
    declared = specs()
    assert [name for name, spec in declared if spec is None] == []
    by_name: dict[str, tuple] = {}
    for _, spec in declared:
        assert spec is not None and spec.help
        assert (spec.kind == "counter") == spec.name.endswith("_total")
        shape = (spec.kind, spec.help, tuple(spec.label_names))
        assert by_name.setdefault(spec.name, shape) == shape  # one family, one description
    assert set(by_name) == NAMES


def test_text_exposition_passes_promtool():
    body, content_type = exposition(registry(busy_metrics()))
    assert content_type.startswith("text/plain; version=0.0.4")
    run = subprocess.run([promtool(), "check", "metrics"], check=False, input=body, capture_output=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()
    text = body.decode()
    for name in NAMES:
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text


def test_promtool_would_catch_a_broken_exposition():
    """The check above can fail: promtool rejects what a hand-written renderer could emit."""
    bad = b"# TYPE dynasor_probes counter\ndynasor_probes 1\n"
    run = subprocess.run([promtool(), "check", "metrics"], check=False, input=bad, capture_output=True, timeout=60)
    assert run.returncode != 0


def test_values_are_read_at_scrape_time():
    m = busy_metrics()
    reg = registry(m, process=False)
    got = families(exposition(reg)[0].decode())
    assert got["dynasor_requests_total"] == {
        (("code", "200"), ("endpoint", "/v1/chat/completions")): 3.0,
        (("code", "502"), ("endpoint", "/v1/models")): 1.0,
    }
    assert got["dynasor_policy_stops_total"] == {(("mode", "enforce"),): 1.0, (("mode", "shadow"),): 2.0}
    assert got["dynasor_record_queue_depth"] == {(): 7.0}
    assert got["dynasor_certaindex_bucket"][(("kind", "cot"), ("le", "0.1"))] == 1.0
    assert got["dynasor_certaindex_bucket"][(("kind", "cot"), ("le", "1.0"))] == 3.0  # inclusive
    assert got["dynasor_certaindex_count"][(("kind", "sc"),)] == 1.0
    assert got["dynasor_request_duration_seconds_bucket"][(("le", "60.0"),)] == 1.0
    assert got["dynasor_request_duration_seconds_bucket"][(("le", "+Inf"),)] == 2.0
    m.probes["ok"] += 1  # the hot path's plain increment shows in the next scrape
    again = families(exposition(reg)[0].decode())
    assert again["dynasor_probes_total"][(("status", "ok"),)] == 6.0


async def test_the_proxy_serves_text_or_openmetrics_by_accept_header():
    upstream = ScriptedUpstream(lambda call: FakeResponse(200, list(SSE), chat_stream(["a", "b"])))
    app = create_app(Settings(upstream_url="http://scripted.upstream", probe_rate=0), upstream,
                     lambda batch: None)
    async with app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                      base_url="http://proxy") as client:
        await client.post("/v1/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                "stream": True})
        text = await client.get("/metrics")
        om = await client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert families(text.text)["dynasor_requests_total"] == {
        (("code", "200"), ("endpoint", "/v1/chat/completions")): 1.0}
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    parsed = {f.name: f for f in parse_openmetrics(om.text)}  # strict: raises on a bad exposition
    assert parsed["dynasor_requests"].type == "counter"
    assert [s.value for s in parsed["dynasor_requests"].samples if s.name.endswith("_total")] == [1.0]
    assert parsed["dynasor_certaindex"].type == "histogram"

