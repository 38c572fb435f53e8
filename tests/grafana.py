"""The shipped Grafana dashboard, and the metric names its PromQL expressions read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dynasor.json"

# PromQL words that look like names but are not metrics.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset"}
NAME = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every panel target's PromQL."""
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: names not called as functions, outside label
    matchers, strings, ranges and grouping clauses."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in NAME.finditer(expr):
        if expr[m.end():].lstrip().startswith("(") or m.group() in KEYWORDS:
            continue  # a function or an operator
        names.add(m.group())
    return names


def referenced(dashboard: dict[str, Any]) -> set[str]:
    """Every metric the dashboard reads, in panels and in its variables' queries."""
    names = {n for e in expressions(dashboard) for n in metric_names(e)}
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        names.update(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,", text))
    return names
