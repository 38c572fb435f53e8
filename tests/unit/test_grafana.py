"""deploy/grafana/dynasor.json reads only metrics the proxy exports (vLLM's: tests/integration)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import exposition, registry, specs
from tests.grafana import load, metric_names, referenced
from tests.unit.test_metrics import busy_metrics


def exported() -> set[str]:
    """Every sample name the proxy's /metrics carries (histogram series included)."""
    text = exposition(registry(busy_metrics()))[0].decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.parametrize("expr, names", [
    ('sum by (endpoint, code) (rate(dynasor_requests_total{job=~"$job"}[$__rate_interval]))',
     {"dynasor_requests_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[5m])))",
     {"vllm:time_to_first_token_seconds_bucket"}),
    ('a / on (instance) group_left b{le="1e9"} * 1e9 > bool 0.5 unless c offset 5m', {"a", "b", "c"}),
    ('sum(x{name="rate(y)"})', {"x"}),
])
def test_metric_names_are_read_from_promql(expr, names):
    assert metric_names(expr) == names


def test_the_dashboard_reads_only_what_the_proxy_exports():
    dashboard = load()
    names = referenced(dashboard)
    ours = {n for n in names if not n.startswith("vllm:")}
    missing = ours - exported()
    assert not missing, f"the dashboard reads metrics the proxy does not export: {sorted(missing)}"
    assert any(n.startswith("vllm:") for n in names)  # shown beside vLLM's (checked on the engine)


def test_every_dynasor_metric_has_a_panel():
    families = {spec.name.removesuffix("_total") for _, spec in specs() if spec is not None}
    read = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            for n in referenced(load())}
    assert families - read == set(), "add a panel to deploy/grafana/dynasor.json"


def test_panels_are_well_formed():
    dashboard = load()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"]
