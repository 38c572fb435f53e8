"""OpenTelemetry traces of observed requests: off unless `otlp_endpoint` is set.

A request's spans are made after the fact, when its record is built (off the
request path), from the times measured while it ran: the relay does no tracing
work, and with tracing off the proxy pays one `is None` test per request. The
spans of one request:

    POST /v1/chat/completions   SERVER; child of the client's `traceparent`, if any
      dynasor.probe              one per probe (position, answer, tokens, status, certaindex)
      dynasor.decision           the policy's decision (shadow, enforce): stop or go on

The SDK exports in batches from its own thread (OTLP over HTTP). The packages
come with the `otel` extra and are imported only when tracing is on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from proxy.pipeline.record import decision_of, probes_of

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from proxy.pipeline.exchange import Exchange
    from proxy.settings import Settings
    from proxy.store.recorder import Record

log = logging.getLogger(__name__)

ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
PROPAGATED = (b"traceparent", b"tracestate")


class TracingUnavailable(Exception):
    """Tracing was asked for but the OpenTelemetry packages are not installed."""


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a collector's base URL gets the standard `/v1/traces`."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def from_settings(settings: Settings) -> Tracing | None:
    """Tracing to `settings.otlp_endpoint`, or None when it is unset."""
    if settings.otlp_endpoint is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            "otlp_endpoint needs dynasor's otel extra, the OpenTelemetry SDK and its OTLP exporter: "
            "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": "dynasor"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint))))
    return Tracing(provider)


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("dynasor")
        self._propagator = TraceContextTextMapPropagator()

    def request(self, ex: Exchange, record: Record) -> None:
        """The spans of one finished request (called as its record is built)."""
        try:
            self._spans(ex, record)
        except Exception:  # a trace must never cost a record or a request; say what failed
            log.exception("could not trace request %s", ex.request_id)

    def _spans(self, ex: Exchange, record: Record) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        offset = time.time_ns() - time.perf_counter_ns()  # perf_counter() seconds -> epoch ns

        def wall(t: float | None, default: float) -> int:
            return int((default if t is None else t) * 1e9) + offset

        req = record.request
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in ex.client_headers if k in PROPAGATED}
        route = ROUTES.get(ex.kind, ex.kind)
        span = self._tracer.start_span(
            f"POST {route}", context=self._propagator.extract(carrier) if carrier else None,
            kind=SpanKind.SERVER, start_time=wall(ex.started, ex.started),
            attributes=_clean({
                "http.request.method": "POST", "http.route": route,
                "http.response.status_code": ex.status, "gen_ai.request.model": req.get("model"),
                "gen_ai.usage.input_tokens": req.get("prompt_tokens"),
                "gen_ai.usage.output_tokens": req.get("completion_tokens"),
                "dynasor.request_id": ex.request_id, "dynasor.mode": ex.mode,
                "dynasor.policy": req.get("policy"), "dynasor.stream": req.get("stream"),
                "dynasor.program_id": ex.program_id, "dynasor.probe_count": req.get("probe_count"),
                "dynasor.ttft_ms": req.get("ttft_ms"), "dynasor.finish_reason": req.get("finish_reason"),
                "dynasor.enforced": ex.enforced is not None,
            }))
        parent = trace.set_span_in_context(span)
        ends: dict[int, float] = {}
        for choice, p in probes_of(ex):
            probe = self._tracer.start_span(
                "dynasor.probe", context=parent, start_time=wall(p.started, ex.finished),
                attributes=_clean({
                    "dynasor.choice": choice, "dynasor.position": p.position,
                    "dynasor.answer": p.answer, "dynasor.hesitant": p.hesitant,
                    "dynasor.output_tokens": p.output_tokens, "dynasor.status": p.status,
                    "dynasor.certaindex": p.certaindex, "dynasor.probe_kind": p.kind,
                    "dynasor.confidence": p.confidence,
                }))
            if p.status != "ok":
                probe.set_status(Status(StatusCode.ERROR if p.status == "error" else StatusCode.UNSET))
            ended = p.ended if p.ended is not None else ex.finished
            if p.status == "ok":
                ends.setdefault(p.position, ended)
            probe.end(end_time=wall(ended, ex.finished))
        if ex.plan is not None and ex.plan.policy_name is not None:
            stop = decision_of(ex)
            # Decided when the probe it rests on came back; a request the policy let run, at its end.
            at = wall(ends.get(stop.position) if stop and ex.program is None else None, ex.finished)
            self._tracer.start_span(
                "dynasor.decision", context=parent, start_time=at,
                attributes=_clean({
                    "dynasor.policy": ex.plan.policy_name, "dynasor.mode": ex.mode,
                    "dynasor.stop": stop is not None, "dynasor.enforced": ex.enforced is not None,
                    "dynasor.position": stop.position if stop else None,
                    "dynasor.answer": stop.answer if stop else None,
                    "dynasor.reason": stop.reason if stop else None,
                })).end(end_time=at)
        error = req.get("error")
        if ex.status >= 500 or error:
            span.set_status(Status(StatusCode.ERROR, str(error or f"HTTP {ex.status}")))
        span.end(end_time=wall(ex.finished, ex.finished))

    def shutdown(self) -> None:
        """Export what is still queued (blocking: call from a worker thread)."""
        self._provider.shutdown()


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """OpenTelemetry attributes take no None."""
    return {k: v for k, v in attributes.items() if v is not None}
