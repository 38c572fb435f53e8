"""The proxy's own counters, rendered in the Prometheus text format (`GET /metrics`)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

CERTAINDEX_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        lines, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        lab = f"{{{labels}}}" if labels else ""
        lines += [f"{name}_sum{lab} {self.total:.6g}", f"{name}_count{lab} {self.n}"]
        return lines


@dataclass
class Metrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (endpoint, status)
    upstream_errors: Counter[str] = field(default_factory=Counter)  # reason
    probes: Counter[str] = field(default_factory=Counter)  # status
    probe_tokens: int = 0
    main_tokens: int = 0
    records_written: int = 0
    records_dropped: int = 0
    records_sanitised: int = 0  # stored with values made to fit their columns
    records_rejected: int = 0  # refused by the store even so: dropped alone
    writer_restarts: int = 0
    write_errors: int = 0
    active_streams: int = 0
    enforced_stops: int = 0
    rollbacks: int = 0
    shadow_stops: int = 0
    certaindex: dict[str, Histogram] = field(default_factory=dict)
    duration: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    def observe_certaindex(self, kind: str, value: float) -> None:
        self.certaindex.setdefault(kind, Histogram(CERTAINDEX_BUCKETS)).observe(value)

    def render(self, queue_depth: Callable[[], int] = lambda: 0) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        family("dynasor_requests_total", "counter", "Client requests relayed, by endpoint and status.",
               [f'dynasor_requests_total{{endpoint="{e}",code="{c}"}} {v}'
                for (e, c), v in sorted(self.requests.items())])
        family("dynasor_upstream_errors_total", "counter",
               "Upstream failures (connection, timeout, broken stream).",
               [f'dynasor_upstream_errors_total{{reason="{r}"}} {v}'
                for r, v in sorted(self.upstream_errors.items())])
        family("dynasor_probes_total", "counter", "Probes by outcome (ok, error, cancelled, skipped).",
               [f'dynasor_probes_total{{status="{s}"}} {v}' for s, v in sorted(self.probes.items())])
        family("dynasor_probe_tokens_total", "counter", "Tokens decoded by probes.",
               [f"dynasor_probe_tokens_total {self.probe_tokens}"])
        family("dynasor_main_tokens_total", "counter", "Completion tokens of relayed requests.",
               [f"dynasor_main_tokens_total {self.main_tokens}"])
        family("dynasor_policy_stops_total", "counter",
               "Requests the policy stopped: for real (enforce) or on paper (shadow).",
               [f'dynasor_policy_stops_total{{mode="enforce"}} {self.enforced_stops}',
                f'dynasor_policy_stops_total{{mode="shadow"}} {self.shadow_stops}'])
        family("dynasor_guardrail_rollbacks_total", "counter",
               "Rollout scopes a guardrail put back from enforce to shadow.",
               [f"dynasor_guardrail_rollbacks_total {self.rollbacks}"])
        family("dynasor_active_streams", "gauge", "Requests being relayed now.",
               [f"dynasor_active_streams {self.active_streams}"])
        family("dynasor_records_written_total", "counter", "Request records written to the store.",
               [f"dynasor_records_written_total {self.records_written}"])
        family("dynasor_records_dropped_total", "counter", "Request records lost (queue full).",
               [f"dynasor_records_dropped_total {self.records_dropped}"])
        family("dynasor_records_sanitised_total", "counter",
               "Request records stored with values made to fit their columns (e.g. text cut).",
               [f"dynasor_records_sanitised_total {self.records_sanitised}"])
        family("dynasor_records_rejected_total", "counter",
               "Request records the store refused even sanitised: dropped alone, logged.",
               [f"dynasor_records_rejected_total {self.records_rejected}"])
        family("dynasor_store_write_errors_total", "counter", "Failed store writes (retried).",
               [f"dynasor_store_write_errors_total {self.write_errors}"])
        family("dynasor_store_writer_restarts_total", "counter",
               "Times the store writer task stopped unexpectedly and was restarted.",
               [f"dynasor_store_writer_restarts_total {self.writer_restarts}"])
        family("dynasor_record_queue_depth", "gauge", "Records waiting to be written.",
               [f"dynasor_record_queue_depth {queue_depth()}"])
        family("dynasor_request_duration_seconds", "histogram", "Client request duration.",
               self.duration.render("dynasor_request_duration_seconds"))
        family("dynasor_certaindex", "histogram",
               "Certaindex after each probe (cot) or finished sample (sc).",
               [line for kind, h in sorted(self.certaindex.items())
                for line in h.render("dynasor_certaindex", f'kind="{kind}"')])
        return "\n".join(out) + "\n"
