"""The dashboard's vLLM panels read metrics a real vLLM server exports."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.grafana import load, referenced


async def test_the_dashboards_vllm_metrics_exist_on_the_real_server(vllm_url):
    async with httpx.AsyncClient() as client:
        text = (await client.get(vllm_url + "/metrics", timeout=30)).text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    wanted = {n for n in referenced(load()) if n.startswith("vllm:")}
    assert wanted and wanted <= exported, sorted(wanted - exported)
