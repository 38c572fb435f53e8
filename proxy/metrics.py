"""The proxy's own counters, exposed through prometheus-client (`GET /metrics`).

The request path only increments plain attributes of `Metrics` (no locks, no
label lookups, nothing per chunk). A scrape reads them through
`MetricsCollector`, which turns each declared field into a metric family. A
metric is declared once, on its field: name, type, HELP text and labels; a
field without a declaration is a mistake the tests catch.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

CERTAINDEX_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)  # buckets are inclusive: value <= le
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations at or below it) for every bucket, +Inf last."""
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append((floatToGoString(bound), running))
        out.append(("+Inf", self.n))
        return out


@dataclass(frozen=True)
class Spec:
    """How one field of `Metrics` is exposed."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()  # names of the keys of a Counter (or dict of histograms)
    fixed: tuple[tuple[str, str], ...] = ()  # labels every sample of this field carries
    buckets: tuple[float, ...] = ()

    @property
    def label_names(self) -> list[str]:
        return [k for k, _ in self.fixed] + list(self.labels)


def metric(name: str, kind: Kind, help: str, labels: tuple[str, ...] = (),
           buckets: tuple[float, ...] = (), factory: Callable[[], Any] | None = None,
           **fixed: str) -> Any:
    """A field of `Metrics` and its exposition, declared together.

    The field's value is an int (or, read at scrape time, a callable returning one);
    with `labels`, a Counter keyed by the label values (a tuple for several); a
    histogram is a `Histogram`, or with labels a dict of them.
    """
    spec = Spec(name, kind, help, labels, tuple(fixed.items()), buckets)
    if factory is None:
        if kind == "histogram":
            factory = dict if labels else partial(Histogram, buckets)
        else:
            factory = Counter if labels else int
    return field(default_factory=factory, metadata={"metric": spec})


def _zero() -> int:
    return 0


@dataclass
class Metrics:
    requests: Counter[tuple[str, int]] = metric(
        "dynasor_requests_total", "counter", "Client requests relayed, by endpoint and status.",
        labels=("endpoint", "code"))
    upstream_errors: Counter[str] = metric(
        "dynasor_upstream_errors_total", "counter",
        "Upstream failures (connection, timeout, broken stream).", labels=("reason",))
    probes: Counter[str] = metric(
        "dynasor_probes_total", "counter", "Probes by outcome (ok, error, cancelled, skipped).",
        labels=("status",))
    probe_tokens: int = metric("dynasor_probe_tokens_total", "counter", "Tokens decoded by probes.")
    main_tokens: int = metric(
        "dynasor_main_tokens_total", "counter", "Completion tokens of relayed requests.")
    enforced_stops: int = metric(
        "dynasor_policy_stops_total", "counter",
        "Requests the policy stopped: for real (enforce) or on paper (shadow).", mode="enforce")
    shadow_stops: int = metric(
        "dynasor_policy_stops_total", "counter",
        "Requests the policy stopped: for real (enforce) or on paper (shadow).", mode="shadow")
    rollbacks: int = metric(
        "dynasor_guardrail_rollbacks_total", "counter",
        "Rollout scopes a guardrail put back from enforce to shadow.")
    active_streams: int = metric("dynasor_active_streams", "gauge", "Requests being relayed now.")
    records_written: int = metric(
        "dynasor_records_written_total", "counter", "Request records written to the store.")
    records_dropped: int = metric(
        "dynasor_records_dropped_total", "counter", "Request records lost (queue full).")
    records_sanitised: int = metric(
        "dynasor_records_sanitised_total", "counter",
        "Request records stored with values made to fit their columns (e.g. text cut).")
    records_rejected: int = metric(
        "dynasor_records_rejected_total", "counter",
        "Request records the store refused even sanitised: dropped alone, logged.")
    writer_restarts: int = metric(
        "dynasor_store_writer_restarts_total", "counter",
        "Times the store writer task stopped unexpectedly and was restarted.")
    write_errors: int = metric(
        "dynasor_store_write_errors_total", "counter", "Failed store writes (retried).")
    record_queue_depth: Callable[[], int] = metric(
        "dynasor_record_queue_depth", "gauge", "Records waiting to be written.",
        factory=lambda: _zero)
    duration: Histogram = metric(
        "dynasor_request_duration_seconds", "histogram", "Client request duration.",
        buckets=LATENCY_BUCKETS)
    certaindex: dict[str, Histogram] = metric(
        "dynasor_certaindex", "histogram",
        "Certaindex after each probe (cot) or finished sample (sc).", labels=("kind",),
        buckets=CERTAINDEX_BUCKETS)

    def observe_certaindex(self, kind: str, value: float) -> None:
        self.certaindex.setdefault(kind, Histogram(CERTAINDEX_BUCKETS)).observe(value)


def specs() -> list[tuple[str, Spec | None]]:
    """Every field of `Metrics` with its declaration (None: undeclared)."""
    return [(f.name, f.metadata.get("metric")) for f in fields(Metrics)]


_FAMILIES: dict[Kind, Callable[..., Metric]] = {
    "counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily,
}


class MetricsCollector:
    """Reads a `Metrics` at scrape time (a prometheus-client custom collector)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name, spec in specs():
            if spec is None:
                continue
            family = families.get(spec.name)
            if family is None:
                family = families[spec.name] = _FAMILIES[spec.kind](
                    spec.name, spec.help, labels=spec.label_names)
            fixed = [v for _, v in spec.fixed]
            for keys, value in _samples(spec, getattr(self._metrics, name)):
                labels = fixed + keys
                if isinstance(value, Histogram):
                    family.add_metric(labels, value.cumulative(), value.total)  # type: ignore[attr-defined]
                else:
                    family.add_metric(labels, value)  # type: ignore[attr-defined]
        yield from families.values()


def _samples(spec: Spec, value: Any) -> list[tuple[list[str], Any]]:
    """(label values, value) of one field, in label order."""
    if not spec.labels:
        return [([], value() if callable(value) else value)]
    return [([str(k) for k in (key if isinstance(key, tuple) else (key,))], v)
            for key, v in sorted(value.items())]


def registry(metrics: Metrics, process: bool = True) -> CollectorRegistry:
    """The proxy's registry: its own metrics and, with `process`, the process, platform and
    garbage-collector collectors (as every prometheus-client default registry has)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MetricsCollector(metrics))  # type: ignore[arg-type]
    if process:
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
    return reg


def exposition(reg: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The registry in the format the scraper asked for (`Accept`): Prometheus text by
    default, OpenMetrics on request. Returns (body, content type)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(reg), content_type
