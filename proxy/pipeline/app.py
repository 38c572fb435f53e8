"""The proxy: an ASGI app, one pipeline per request.

receive -> plan -> forward -> observe -> relay -> record. In observe (and for
streams in shadow) the client gets the upstream's status, headers (hop-by-hop
aside) and body bytes exactly; probing and recording happen beside the relay,
never in its way. Where a policy must watch or end a generation (shadow and
enforce: non-streamed requests, samples of self-consistency programs, stopped
streams) the proxy writes those responses itself (`proxy.pipeline.endings`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from proxy.control.health import Readiness
from proxy.control.plan import Control
from proxy.core.policy import ScPolicy
from proxy.core.treatment import OPT_HEADER, Mode
from proxy.logs import REQUEST_ID
from proxy.metrics import Metrics, exposition, registry
from proxy.pipeline.assemble import SampleStream, streaming_body
from proxy.pipeline.endings import Endings
from proxy.pipeline.equivalence import AsyncEquivalence
from proxy.pipeline.exchange import (
    END_EARLY_TIMEOUT_S,
    ENFORCED,
    JSON_HEADERS,
    BodyTimeout,
    Departure,
    Exchange,
    Receive,
    Response,
    Scope,
    Send,
    affinity_of,
    assemblable,
    end_early,
    header,
    job_headers,
    json_object,
    pinned,
    probe_headers,
    read_body,
    respond,
    told,
    written_headers,
)
from proxy.pipeline.observe import ResponseObserver
from proxy.pipeline.probe import Prober
from proxy.pipeline.programs import NO_SIGNALS, Programs, ProgramSignals
from proxy.pipeline.record import bare_record, build_record, decision_of
from proxy.pipeline.samples import ProgramRun, Sample, program_outcome
from proxy.pipeline.session import ProbeSession
from proxy.pipeline.sse import error_body, error_frame
from proxy.settings import Settings
from proxy.store.recorder import Record, Recorder, write_records
from proxy.tracing import Tracing, from_settings
from proxy.upstream.base import PROGRAM_HEADER, Headers, Upstream, UpstreamError, forwardable
from proxy.upstream.http import HttpUpstream

log = logging.getLogger(__name__)

OBSERVED = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
OPERATOR_PATHS = frozenset({"/metrics", "/health", "/health/live", "/health/ready"})
INTERRUPTED = "interrupted: the proxy is shutting down"


class ProxyApp:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream | None = None,
        write: Callable[[Sequence[Record]], None] | None = None,
        tracing: Tracing | None = None,
        signals: ProgramSignals = NO_SIGNALS,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or from_settings(settings)
        self.signals = signals
        self.metrics = Metrics()
        self.registry = registry(self.metrics)
        self.upstream: Upstream = upstream or HttpUpstream(
            settings.upstream_url,
            settings.connect_timeout_s,
            settings.read_timeout_s,
            settings.upstream_api_key,
        )
        self._write = write
        self.recorder: Recorder | None = None
        self.prober = Prober(self.upstream, settings, self.metrics, signals)
        self.equivalence = AsyncEquivalence()
        self.programs = Programs(self.equivalence, self.metrics, signals=signals)
        self._finalizing: set[asyncio.Task[None]] = set()
        self._inflight: set[asyncio.Task[Any]] = set()  # requests being served
        self.control = Control(settings, self.metrics)
        self.endings = Endings(settings, self.metrics, self.upstream, self.programs)
        self.readiness = Readiness(self.upstream)

    # -- lifecycle ---------------------------------------------------------

    async def startup(self) -> None:
        if self._write is None:
            from proxy.store.db import check_writable, open_store

            engine = await asyncio.to_thread(open_store, self.settings.db_url)
            self._write = partial(write_records, engine)
            self.readiness.store_check = partial(check_writable, engine)
            await self.control.start(engine)
        recorder = self.recorder = Recorder(self._write, self.metrics, self.settings.record_queue_size)
        self.metrics.record_queue_depth = lambda: recorder.pending
        recorder.start()
        self.equivalence.warm()

    async def shutdown(self) -> None:
        await self.control.stop()
        if self._inflight:  # requests the server interrupted: let them say so and record it
            await asyncio.wait(self._inflight, timeout=END_EARLY_TIMEOUT_S + 3)
        if self._finalizing:
            await asyncio.wait(self._finalizing, timeout=10)
        if self.recorder is not None:
            await self.recorder.close()
        await self.upstream.aclose()
        self.equivalence.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)

    async def __aenter__(self) -> ProxyApp:
        await self.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- ASGI --------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in OPERATOR_PATHS:
            await self._operator(path, scope, send)
        else:
            observed = OBSERVED.get(path) if method == "POST" else None
            ex = Exchange(uuid.uuid4().hex if observed else "", observed or "", None,
                          time.perf_counter(), None, None, None, client_headers=scope["headers"])
            await self._guarded(scope, receive, Response(send), ex)

    async def _guarded(self, scope: Scope, receive: Receive, send: Response, ex: Exchange) -> None:
        """One request, whatever happens to it: ended for the client, counted, recorded.

        A cancellation that is not the client leaving (Departure handles that) is the
        proxy shutting down: the request is interrupted, and says so.
        """
        me = asyncio.current_task()
        assert me is not None
        self._inflight.add(me)
        try:
            try:
                await (self._observed(scope, receive, send, ex) if ex.kind
                       else self._passthrough(scope, receive, send, ex))
            except asyncio.CancelledError:
                me.uncancel()
                ex.error = ex.error or INTERRUPTED
                ex.status = await told(me, end_early(send, INTERRUPTED, "proxy_shutdown", 503)) or ex.status
            except BodyTimeout as exc:  # not a request yet: counted, not recorded
                ex.body, ex.error, ex.status = None, str(exc), 400
                # The rest of the body may still come: the connection cannot carry another request.
                await told(me, respond(send, 400, error_body(str(exc), "invalid_request_error", 400),
                                        [*JSON_HEADERS, (b"connection", b"close")]))
            except Exception as exc:  # a bug must cost one request, not the proxy
                log.exception("request %s failed inside the proxy", ex.request_id or scope["path"])
                ex.error = f"proxy error: {type(exc).__name__}: {exc}"
                ex.status = await told(me, end_early(
                    send, f"internal error in the proxy ({type(exc).__name__})", "proxy_error", 500)) or ex.status
            ex.finished = ex.finished or time.perf_counter()
            self._after(scope, ex)
        finally:
            self._inflight.discard(me)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # reported by the server, which then exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _operator(self, path: str, scope: Scope, send: Send) -> None:
        """The proxy's own endpoints: metrics, health, and the probes Kubernetes expects."""
        if path == "/metrics":
            body, content_type = exposition(self.registry, header(scope["headers"], b"accept"))
            await respond(send, 200, body, [(b"content-type", content_type.encode())])
            return
        status, answer = 200, {"status": "alive"}
        if path == "/health":
            answer = self.health()
        elif path == "/health/ready":
            rec = self.recorder
            ready, checks = await self.readiness.check(rec is not None, rec is None or rec.healthy)
            status, answer = (200 if ready else 503), {"status": "ready" if ready else "not ready",
                                                      "checks": checks}
        await respond(send, status, json.dumps(answer).encode(), JSON_HEADERS)

    def health(self) -> dict[str, Any]:
        rec, m = self.recorder, self.metrics
        store_ok = rec is None or rec.healthy
        # Lost records, and a writer that had to be restarted, stay visible until restart:
        # the operator must learn of them.
        ok = (store_ok and m.records_dropped == 0 and m.records_rejected == 0 and m.writer_restarts == 0
              and (rec is None or rec.running))
        return {
            "status": "ok" if ok else "degraded",
            "rollout": self._rollout_health(),
            "guardrails": self.control.guardrails.status(),
            "upstream": self.upstream.base_url,
            "store": {
                "ok": store_ok,
                "pending": rec.pending if rec else 0,
                "written": m.records_written,
                "dropped": m.records_dropped,
                "sanitised": m.records_sanitised,
                "rejected": m.records_rejected,
                "write_errors": m.write_errors,
                "writer": {"running": rec.running if rec else False, "restarts": m.writer_restarts},
                "last_error": rec.last_error if rec else None,
            },
            "active_streams": m.active_streams,
        }

    def _rollout_health(self) -> dict[str, Any]:
        state = self.control.state
        if state is None or not state.scopes:
            return {"source": "flags", "mode": self.settings.mode, "policy": self.settings.policy_file,
                    "enforce_percent": self.settings.enforce_percent}
        return {"source": "store", "version": state.version, "poll_error": self.control.poll_error,
                "scopes": {k: {"mode": v.mode, "percent": v.percent, "policy_id": v.policy_id}
                           for k, v in state.scopes.items()}}

    # -- the pipeline --------------------------------------------------------

    async def _observed(self, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> None:
        raw = await read_body(receive, self.settings.request_body_timeout_s)
        body = ex.body = json_object(raw)
        kind = ex.kind
        headers: Headers = scope["headers"]
        REQUEST_ID.set(ex.request_id)  # for log lines, here and in the tasks this request starts
        if body is not None:
            stream = bool(body.get("stream"))
            n = body.get("n") if isinstance(body.get("n"), int) else 1
            tag = header(headers, PROGRAM_HEADER)
            ex.program_id = tag or (ex.request_id if n > 1 else None)
            ex.affinity = affinity_of(headers, self.settings.affinity_header,
                                      ex.program_id or ex.request_id)
            model = body.get("model") if isinstance(body.get("model"), str) else None
            ex.plan = self.control.plan(model, header(headers, b"authorization"), ex.program_id or ex.request_id,
                                        header(headers, OPT_HEADER), n, tag is not None)
            ex.mode = ex.plan.mode
            if ex.mode == "off":  # the client opted out: a plain relay, not recorded
                await self._relay(scope, receive, send, raw, ex)
                return
            watched = ex.mode in ("shadow", "enforce") and self._should_probe(kind, body, ex.mode)
            if n > 1 and ex.plan.sc is not None and watched and assemblable(body, ex.mode):
                await self._program(scope, receive, send, ex, ex.plan.sc)
                return
            ex.member = n == 1 and ex.plan.sc is not None and watched
            verdict = self.programs.verdict(tag) if ex.member and tag and ex.mode == "enforce" else None
            if verdict is not None:  # the program is decided: this sample is not generated
                await self.endings.from_verdict(send, ex, verdict)
                return
            ex.assembled = not stream and n == 1 and assemblable(body, ex.mode)
            if (stream or ex.assembled) and n == 1 and self._should_probe(kind, body, ex.mode):
                ex.probes = ProbeSession(self.prober, kind, body, probe_headers(headers, ex.program_key, ex.affinity),
                                         ex.plan.policy, enforcing=ex.mode == "enforce", program=ex.program_key)
            ex.assembled = ex.assembled and (ex.probes is not None or ex.member)
            if ex.mode != "observe" and ex.probes is None and not ex.member:
                # Nothing here the policy can watch (tools, logprobs, no prompt): say so.
                ex.mode, ex.plan = "observe", dataclasses.replace(ex.plan, mode="observe", policy_name=None)
            if ex.assembled:  # the policy needs the generation as it grows
                raw = json.dumps(streaming_body(body)).encode()
            interval = ex.probes.interval(self.settings.probe_interval) if ex.probes else 0
            ex.observer = ResponseObserver(kind, stream or ex.assembled,
                                           ex.probes.on_tokens if ex.probes else None,
                                           interval or self.settings.probe_interval, live=ex.member)
        try:
            await self._relay(scope, receive, send, raw, ex)
        finally:
            if ex.probes is not None:
                try:
                    await ex.probes.close(ex.observer.live_choice(0) if ex.observer else None)
                except Exception:  # a bug in the probes must not lose the request's record
                    log.exception("closing the probes of request %s failed", ex.request_id)

    def _after(self, scope: Scope, ex: Exchange) -> None:
        """Count the request and record it, off the request path (once)."""
        if ex.recorded:
            return
        ex.recorded = True
        self._count(scope["path"], ex)
        self._ended(ex)
        if ex.body is not None and ex.mode != "off" and self.recorder is not None:
            task = asyncio.create_task(self._finalize(ex))
            self._finalizing.add(task)
            task.add_done_callback(self._finalizing.discard)

    def _ended(self, ex: Exchange) -> None:
        """A request that was a program of its own (alone, or n > 1 untagged) needs nothing more;
        a tagged program may send more requests: it is done once its policy stops it."""
        if ex.kind and (ex.program_id is None or ex.program_id == ex.request_id):
            self.signals.program_done(ex.program_key)

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> None:
        raw = await read_body(receive, self.settings.request_body_timeout_s)
        await self._relay(scope, receive, send, raw, ex)

    def _should_probe(self, kind: str, body: dict[str, Any], mode: Mode) -> bool:
        rate = self.settings.probe_rate
        # The policy needs its probes in shadow and enforce; the rate samples observe.
        if mode == "observe" and (rate <= 0 or (rate < 1 and random.random() >= rate)):
            return False
        if kind == "chat":
            return isinstance(body.get("messages"), list) and bool(body["messages"])
        return isinstance(body.get("prompt"), str)

    async def _relay(self, scope: Scope, receive: Receive, send: Send, raw: bytes, ex: Exchange) -> None:
        path = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else "")
        self.metrics.active_streams += 1
        try:
            try:
                headers = pinned(scope["headers"], ex.affinity)
                if ex.body is not None:  # an observed request: its program and kind of job too
                    headers = job_headers(headers, ex.program_key, ex.job_kind)
                resp = await self.upstream.send(scope["method"], path, headers, raw)
            except UpstreamError as exc:
                self.metrics.upstream_errors[exc.kind] += 1
                ex.status, ex.error = exc.status, str(exc)
                await respond(send, exc.status, error_body(str(exc), exc.error_type, exc.status), JSON_HEADERS)
                return
            ex.status = resp.status
            await self._stream(receive, send, resp, ex)
        finally:
            self.metrics.active_streams -= 1
            ex.finished = time.perf_counter()

    async def _stream(self, receive: Receive, send: Send, resp: Any, ex: Exchange) -> None:
        """Relay the response body chunk by chunk; notice a client that goes away.

        An assembled request's chunks are only observed; the client gets the whole
        completion at the end.
        """
        client = Departure(receive)
        observer = ex.observer
        is_sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in resp.headers)
        if observer is not None:
            observer.framing(is_sse)
        enforcing = is_sse and ((ex.probes is not None and ex.probes.enforcing)
                                or (ex.member and ex.mode == "enforce"))
        assembling = ex.assembled and is_sse and resp.status == 200
        headers = forwardable(resp.headers) + ([ENFORCED] if enforcing else [])
        try:
            if not assembling:
                await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            async for chunk in resp.chunks():
                if ex.ttft_s is None:
                    ex.ttft_s = time.perf_counter() - ex.started
                if observer is not None:
                    observer.feed(chunk)
                if not assembling:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if enforcing and resp.status == 200 and (stop := self.endings.stop_now(ex)) is not None:
                    ex.enforced = stop
                    break  # closing the response below aborts the upstream request
        except UpstreamError as exc:
            self.metrics.upstream_errors[exc.kind] += 1
            ex.error = str(exc)
            if is_sse and not assembling:  # the client still gets a well-formed end of stream
                client.stop()
                await send({"type": "http.response.body", "more_body": True,
                            "body": error_frame(str(exc), exc.error_type, exc.status)})
            elif not assembling:  # a body cut mid-way: the client must see it cut, not shorter
                log.warning("request %s: %s; the client's response is cut off too",
                            ex.request_id or "(not observed)", exc)
                return
        except asyncio.CancelledError:
            client.left(ex)
        except OSError:  # some servers raise on send() to a closed connection
            client.gone = True
            client.left(ex)
        finally:
            client.stop()
            await resp.aclose()
        if client.gone:
            return
        if assembling:
            await self.endings.whole(send, ex, written_headers(resp.headers, enforcing, JSON_HEADERS))
            return
        if ex.enforced is not None:
            await send({"type": "http.response.body", "body": await self.endings.tail(ex), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _program(self, scope: Scope, receive: Receive, send: Send, ex: Exchange,
                       policy: ScPolicy) -> None:
        """A request of several samples under a self-consistency policy (see proxy.pipeline.samples)."""
        assert ex.body is not None
        enforcing = ex.mode == "enforce"
        headers: Headers = scope["headers"]
        run = ProgramRun(self.upstream, self.prober, self.equivalence, ex.kind, scope["path"], ex.body,
                         job_headers(pinned(headers, ex.affinity), ex.program_key, "sample"),
                         probe_headers(headers, ex.program_key, ex.affinity), policy, enforcing,
                         self.settings.sc_parallel or policy.min_samples, ex.program_key)
        stream = SampleStream() if ex.body.get("stream") else None
        started = False

        async def finished(sample: Sample) -> None:
            nonlocal started
            if ex.ttft_s is None:
                ex.ttft_s = time.perf_counter() - ex.started
            if stream is None:
                return
            if not started:
                await send({"type": "http.response.start", "status": 200,
                            "headers": written_headers(sample.headers, enforcing)})
                started = True
            await send({"type": "http.response.body", "body": stream.sample(sample.chunks), "more_body": True})

        client = Departure(receive)
        self.metrics.active_streams += 1
        try:
            result = await run.run(finished)
        except asyncio.CancelledError:
            client.left(ex)
            return
        except OSError:
            client.gone = True
            client.left(ex)
            return
        finally:
            client.stop()
            self.metrics.active_streams -= 1
            ex.finished = time.perf_counter()
        ex.program = result
        await self.endings.program(send, ex, result, stream, started)

    async def _finalize(self, ex: Exchange) -> None:
        """Turn what was observed into a record (off the request path) and queue it."""
        try:
            if ex.program is not None:
                outcome = program_outcome(ex.program)
            else:
                outcome = ex.observer.finish() if ex.observer else None
            record = await build_record(ex, outcome, self)
        except Exception as exc:  # keep what is known rather than nothing
            log.exception("could not build the whole record of request %s", ex.request_id)
            record = bare_record(ex, self.upstream.base_url, f"record incomplete: {type(exc).__name__}")
        assert self.recorder is not None
        if ex.member and ex.plan is not None and ex.plan.sc is not None and ex.program_id:
            verdict = self.programs.decide(ex.program_id, ex.plan.sc)
            if verdict is not None:  # this sample's answer stopped its program
                record.request.update(decision_token=verdict.samples, decision_answer=verdict.answer)
        self.recorder.put(record)
        if self.tracing is not None:
            self.tracing.request(ex, record)
        if ex.plan is not None:
            req = record.request
            # A tagged program has no last sample to compare its verdict with: errors and latency only.
            stop = None if ex.member else decision_of(ex)
            await self.control.judge(ex.plan, ex.status != 200 or ex.error is not None,
                                     ex.finished - ex.started, stop.answer if stop else None,
                                     req.get("final_answer"), stop is not None)

    def _count(self, path: str, ex: Exchange) -> None:
        endpoint = path if path in OBSERVED or path in ("/v1/models",) else "other"
        self.metrics.requests[(endpoint, ex.status)] += 1
        self.metrics.duration.observe(ex.finished - ex.started)




def create_app(
    settings: Settings,
    upstream: Upstream | None = None,
    write: Callable[[Sequence[Record]], None] | None = None,
    tracing: Tracing | None = None,
) -> ProxyApp:
    """The proxy; `upstream`, `write` and `tracing` replace the HTTP upstream, the store and
    the OTLP exporter set by `settings` (tests)."""
    return ProxyApp(settings, upstream, write, tracing)


