"""The observe-mode proxy: an ASGI app, one pipeline per request.

receive -> forward -> observe -> relay -> record. The client gets the
upstream's status, headers (hop-by-hop aside) and body bytes exactly; probing
and recording happen beside the relay, never in its way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from proxy.assemble import SampleStream, Usage, choice_body, completion, streaming_body
from proxy.control import Control, Plan
from proxy.enforce import (
    OPT_HEADER,
    Mode,
    StopInfo,
    answer_text,
    stop_extension,
    tail_chunks,
    verdict_extension,
)
from proxy.equivalence import AsyncEquivalence
from proxy.metrics import Metrics
from proxy.observe import ChoiceText, ResponseObserver
from proxy.policy import ScPolicy
from proxy.probe import Prober, ProbeSession
from proxy.programs import PROGRAM_HEADER, Programs, Verdict
from proxy.record import build_record, decision_of
from proxy.recorder import Record, Recorder, write_records
from proxy.samples import ProgramResult, ProgramRun, Sample, program_extension, program_outcome
from proxy.settings import Settings
from proxy.sse import error_body, error_frame
from proxy.upstream import Headers, HttpUpstream, Upstream, UpstreamError, forwardable

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

OBSERVED = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass
class Exchange:
    """What one relayed request produced, for the record."""

    request_id: str
    kind: str
    body: dict[str, Any] | None
    started: float
    observer: ResponseObserver | None
    probes: ProbeSession | None
    program_id: str | None
    status: int = 0
    error: str | None = None
    ttft_s: float | None = None
    finished: float = 0.0
    mode: Mode = "observe"
    plan: Plan | None = None
    enforced: StopInfo | None = None  # set when the proxy ended the stream itself
    assembled: bool = False  # a non-streamed request the proxy answers from an upstream stream
    program: ProgramResult | None = None  # the samples of a request run under a self-consistency policy
    member: bool = False  # one sample of a tagged program under a self-consistency policy


class ProxyApp:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream | None = None,
        write: Callable[[Sequence[Record]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.upstream: Upstream = upstream or HttpUpstream(
            settings.upstream_url,
            settings.connect_timeout_s,
            settings.read_timeout_s,
            settings.upstream_api_key,
        )
        self._write = write
        self.recorder: Recorder | None = None
        self.prober = Prober(self.upstream, settings, self.metrics)
        self.equivalence = AsyncEquivalence()
        self.programs = Programs(self.equivalence, self.metrics)
        self._finalizing: set[asyncio.Task[None]] = set()
        self.control = Control(settings, self.metrics)

    # -- lifecycle ---------------------------------------------------------

    async def startup(self) -> None:
        if self._write is None:
            from proxy.store.db import open_store

            engine = await asyncio.to_thread(open_store, self.settings.db_url)
            self._write = partial(write_records, engine)
            await self.control.start(engine)
        self.recorder = Recorder(self._write, self.metrics, self.settings.record_queue_size)
        self.recorder.start()
        self.equivalence.warm()

    async def shutdown(self) -> None:
        await self.control.stop()
        if self._finalizing:
            await asyncio.wait(self._finalizing, timeout=10)
        if self.recorder is not None:
            await self.recorder.close()
        await self.upstream.aclose()
        self.equivalence.close()

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
        if path == "/health" and method == "GET":
            await self._respond(send, 200, json.dumps(self.health()).encode(), JSON_HEADERS)
        elif path == "/metrics" and method == "GET":
            text = self.metrics.render(lambda: self.recorder.pending if self.recorder else 0)
            await self._respond(send, 200, text.encode(), [(b"content-type", b"text/plain; version=0.0.4")])
        elif path in OBSERVED and method == "POST":
            await self._observed(scope, receive, send, OBSERVED[path])
        else:
            await self._passthrough(scope, receive, send)

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

    def health(self) -> dict[str, Any]:
        rec = self.recorder
        store_ok = rec is None or rec.healthy
        # Lost records stay visible until restart: the operator must learn of them.
        ok = store_ok and self.metrics.records_dropped == 0
        return {
            "status": "ok" if ok else "degraded",
            "rollout": self._rollout_health(),
            "guardrails": self.control.guardrails.status(),
            "upstream": self.upstream.base_url,
            "store": {
                "ok": store_ok,
                "pending": rec.pending if rec else 0,
                "written": self.metrics.records_written,
                "dropped": self.metrics.records_dropped,
                "write_errors": self.metrics.write_errors,
                "last_error": rec.last_error if rec else None,
            },
            "active_streams": self.metrics.active_streams,
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

    async def _observed(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        started = time.perf_counter()
        raw = await _read_body(receive)
        body = _json_object(raw)
        headers: Headers = scope["headers"]
        ex = Exchange(uuid.uuid4().hex, kind, body, started, None, None, None)
        if body is not None:
            stream = bool(body.get("stream"))
            n = body.get("n") if isinstance(body.get("n"), int) else 1
            tag = _header(headers, PROGRAM_HEADER)
            ex.program_id = tag or (ex.request_id if n > 1 else None)
            model = body.get("model") if isinstance(body.get("model"), str) else None
            ex.plan = self.control.plan(model, _header(headers, b"authorization"), ex.program_id or ex.request_id,
                                        _header(headers, OPT_HEADER), n, tag is not None)
            ex.mode = ex.plan.mode
            if ex.mode == "off":  # the client opted out: a plain relay, not recorded
                await self._relay(scope, receive, send, raw, ex)
                self._count(scope["path"], ex)
                return
            watched = ex.mode in ("shadow", "enforce") and self._should_probe(kind, body, ex.mode)
            if n > 1 and ex.plan.sc is not None and watched and _assemblable(body, ex.mode):
                await self._program(scope, receive, send, ex, ex.plan.sc)
                self._after(scope, ex)
                return
            ex.member = n == 1 and ex.plan.sc is not None and watched
            verdict = self.programs.verdict(tag) if ex.member and tag and ex.mode == "enforce" else None
            if verdict is not None:  # the program is decided: this sample is not generated
                await self._from_verdict(send, ex, verdict)
                self._after(scope, ex)
                return
            ex.assembled = not stream and n == 1 and _assemblable(body, ex.mode)
            if (stream or ex.assembled) and n == 1 and self._should_probe(kind, body, ex.mode):
                ex.probes = self.prober.session(kind, body, _probe_headers(headers), ex.plan.policy,
                                                enforcing=ex.mode == "enforce")
            ex.assembled = ex.assembled and (ex.probes is not None or ex.member)
            if ex.assembled:  # the policy needs the generation as it grows
                raw = json.dumps(streaming_body(body)).encode()
            interval = ex.probes.interval(self.settings.probe_interval) if ex.probes else 0
            ex.observer = ResponseObserver(kind, stream or ex.assembled,
                                           ex.probes.on_tokens if ex.probes else None,
                                           interval or self.settings.probe_interval, live=ex.member)
        await self._relay(scope, receive, send, raw, ex)
        if ex.probes is not None:
            await ex.probes.close()
        self._after(scope, ex)

    def _after(self, scope: Scope, ex: Exchange) -> None:
        """Count the request and record it, off the request path."""
        self._count(scope["path"], ex)
        if ex.body is not None and self.recorder is not None:
            task = asyncio.create_task(self._finalize(ex))
            self._finalizing.add(task)
            task.add_done_callback(self._finalizing.discard)

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        ex = Exchange("", "", None, time.perf_counter(), None, None, None)
        await self._relay(scope, receive, send, raw, ex)
        self._count(scope["path"], ex)

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
                resp = await self.upstream.send(scope["method"], path, scope["headers"], raw)
            except UpstreamError as exc:
                self.metrics.upstream_errors[exc.kind] += 1
                ex.status, ex.error = exc.status, str(exc)
                kind = "upstream_timeout" if exc.kind == "timeout" else "upstream_unavailable"
                await self._respond(send, exc.status, error_body(str(exc), kind, exc.status), JSON_HEADERS)
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
        enforcing = is_sse and ((ex.probes is not None and ex.probes.enforcing)
                                or (ex.member and ex.mode == "enforce"))
        assembling = ex.assembled and is_sse and resp.status == 200
        headers = forwardable(resp.headers)
        if enforcing:
            headers.append((b"x-dynasor-mode", b"enforce"))
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
                if enforcing and resp.status == 200 and (stop := self._stop_now(ex)) is not None:
                    ex.enforced = stop
                    break  # closing the response below aborts the upstream request
        except UpstreamError as exc:
            self.metrics.upstream_errors[exc.kind] += 1
            ex.error = str(exc)
            if is_sse and not assembling:  # the client still gets a well-formed end of stream
                client.stop()
                await send({"type": "http.response.body", "body": error_frame(str(exc)), "more_body": True})
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
            await self._whole(send, ex, headers)
            return
        if ex.enforced is not None:
            await send({"type": "http.response.body", "body": await self._tail(ex), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _stop_now(self, ex: Exchange) -> StopInfo | None:
        """Whether an enforced request must end now: its policy fired, or its program's did."""
        if ex.probes is not None and ex.probes.enforcing:
            return ex.probes.stop
        verdict = self.programs.verdict(ex.program_id) if ex.member and ex.program_id else None
        return _verdict_stop(verdict) if verdict is not None else None

    def _extension(self, ex: Exchange, tokens: int) -> dict[str, Any]:
        assert ex.enforced is not None
        return (verdict_extension if ex.member else stop_extension)(ex.enforced, tokens)

    async def _from_verdict(self, send: Send, ex: Exchange, verdict: Verdict) -> None:
        """A sample of a decided program, answered with the program's answer and generating nothing."""
        assert ex.body is not None
        ex.enforced, ex.status, ex.finished = _verdict_stop(verdict), 200, time.perf_counter()
        self.metrics.enforced_stops += 1
        envelope = {"id": f"dynasor-{ex.request_id}", "created": int(time.time()), "model": ex.body.get("model")}
        text = answer_text(verdict.answer, self.settings.answer_template, "")
        prompt_tokens = await self._prompt_tokens(ex) if _wants_usage(ex) else None
        extension = verdict_extension(ex.enforced, 0)
        if ex.body.get("stream"):
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-dynasor-mode", b"enforce")]
            body = tail_chunks(ex.kind, envelope, text, extension, 0, prompt_tokens, _wants_usage(ex))
        else:
            headers = [*JSON_HEADERS, (b"x-dynasor-mode", b"enforce")]
            part = choice_body(ex.kind, 0, ChoiceText(0), None, text.lstrip("\n"), "stop")
            body = completion(ex.kind, envelope, [part], Usage(prompt_tokens, 0), extension)
        await self._respond(send, 200, body, headers)

    async def _program(self, scope: Scope, receive: Receive, send: Send, ex: Exchange,
                       policy: ScPolicy) -> None:
        """A request of several samples under a self-consistency policy (see proxy.samples)."""
        assert ex.body is not None
        enforcing = ex.mode == "enforce"
        headers: Headers = scope["headers"]
        run = ProgramRun(self.upstream, self.prober, self.equivalence, ex.kind, scope["path"], ex.body,
                         headers, _probe_headers(headers), policy, enforcing,
                         self.settings.sc_parallel or policy.min_samples)
        stream = SampleStream() if ex.body.get("stream") else None
        started = False

        async def finished(sample: Sample) -> None:
            nonlocal started
            if ex.ttft_s is None:
                ex.ttft_s = time.perf_counter() - ex.started
            if stream is None:
                return
            if not started:
                out = [(k, v) for k, v in forwardable(sample.headers) if k != b"content-length"]
                if enforcing:
                    out.append((b"x-dynasor-mode", b"enforce"))
                await send({"type": "http.response.start", "status": 200, "headers": out})
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
        if result.failed is not None:
            await self._program_failed(send, ex, result.failed, started)
            return
        ex.status = 200
        if enforcing and result.decided_at is not None and len(result.finished) < result.requested:
            self.metrics.enforced_stops += 1
            ex.enforced = decision_of(ex)
        extension = program_extension(result) if enforcing else None
        usage = Usage(result.prompt_tokens, result.generated_tokens)
        if stream is not None:
            include = _wants_usage(ex)
            await send({"type": "http.response.body", "body": stream.end(usage if include else None, extension),
                        "more_body": False})
            return
        first = result.finished[0].observer
        choices = [choice_body(ex.kind, i, s.observer.finish().choices[0], s.observer.reasoning_field)
                   for i, s in enumerate(result.finished)]
        forwarded = [(k, v) for k, v in forwardable(result.finished[0].headers)
                     if k not in (b"content-type", b"content-length")]
        if enforcing:
            forwarded.append((b"x-dynasor-mode", b"enforce"))
        await self._respond(send, 200, completion(ex.kind, first.envelope, choices, usage, extension),
                            JSON_HEADERS + forwarded)

    async def _program_failed(self, send: Send, ex: Exchange, failed: Sample, started: bool) -> None:
        """A sample the upstream failed fails the request, as it would have failed upstream."""
        ex.status, ex.error = failed.status if failed.status != 200 else 502, failed.error
        if started:
            await send({"type": "http.response.body", "body": error_frame(failed.error or "upstream error"),
                        "more_body": False})
        elif failed.error_body:
            await self._respond(send, failed.status, failed.error_body, forwardable(failed.headers))
        else:
            await self._respond(send, ex.status, error_body(failed.error or "upstream error", "upstream_error",
                                                            ex.status), JSON_HEADERS)

    async def _stopped_text(self, ex: Exchange) -> tuple[int, str, int | None]:
        """For a stopped request: tokens generated, the text that ends it, the prompt's tokens."""
        assert ex.observer is not None and ex.enforced is not None and ex.body is not None
        self.metrics.enforced_stops += 1
        choice = ex.observer.live_choice(0)
        text = answer_text(ex.enforced.answer, self.settings.answer_template,
                           choice.content_text if choice else "")
        prompt_tokens = await self._prompt_tokens(ex) if _wants_usage(ex) else None
        return (choice.tokens if choice else 0), text, prompt_tokens

    async def _tail(self, ex: Exchange) -> bytes:
        """The end of a stream the policy stopped: the answer, finish_reason stop, [DONE]."""
        assert ex.observer is not None and ex.enforced is not None and ex.body is not None
        tokens, text, prompt_tokens = await self._stopped_text(ex)
        return tail_chunks(ex.kind, ex.observer.envelope, text, self._extension(ex, tokens), tokens,
                           prompt_tokens, _wants_usage(ex))

    async def _whole(self, send: Send, ex: Exchange, upstream_headers: Headers) -> None:
        """The completion a non-streamed request asked for, from the stream the proxy watched."""
        assert ex.observer is not None
        outcome = ex.observer.finish()
        headers = [(k, v) for k, v in upstream_headers if k not in (b"content-type", b"content-length")]
        if ex.error is not None or outcome.error is not None:
            ex.status = 502
            message = ex.error or f"upstream error mid-generation: {outcome.error}"
            await self._respond(send, 502, error_body(message, "upstream_error", 502), JSON_HEADERS + headers)
            return
        choice = ex.observer.live_choice(0) or ChoiceText(0)
        field = ex.observer.reasoning_field
        if ex.enforced is not None:
            tokens, text, prompt_tokens = await self._stopped_text(ex)
            part = choice_body(ex.kind, 0, choice, field, text, "stop")
            body = completion(ex.kind, ex.observer.envelope, [part], Usage(prompt_tokens, tokens),
                              self._extension(ex, tokens))
        else:
            tokens = outcome.completion_tokens if outcome.completion_tokens is not None else choice.tokens
            body = completion(ex.kind, ex.observer.envelope, [choice_body(ex.kind, 0, choice, field)],
                              Usage(outcome.prompt_tokens, tokens))
        await self._respond(send, 200, body, JSON_HEADERS + headers)

    async def _prompt_tokens(self, ex: Exchange) -> int | None:
        """The prompt's token count, from a one-token request (the prefix cache makes it cheap)."""
        assert ex.body is not None
        body = {k: v for k, v in ex.body.items() if k not in ("stream", "stream_options", "n")}
        body.update({"max_tokens": 1, "stream": False})
        body.pop("max_completion_tokens", None)
        path = "/v1/chat/completions" if ex.kind == "chat" else "/v1/completions"
        try:
            resp = await self.upstream.send("POST", path, JSON_HEADERS, json.dumps(body).encode())
            try:
                data = json.loads(b"".join([c async for c in resp.chunks()]))
            finally:
                await resp.aclose()
            return int(data["usage"]["prompt_tokens"])
        except (UpstreamError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not count the prompt's tokens for usage: %s", exc)
            return None

    async def _finalize(self, ex: Exchange) -> None:
        """Turn what was observed into a record (off the request path) and queue it."""
        try:
            if ex.program is not None:
                outcome = program_outcome(ex.program)
            else:
                outcome = ex.observer.finish() if ex.observer else None
            record = await build_record(ex, outcome, self)
        except Exception:  # a record must never take the proxy down; say what failed
            log.exception("could not build the record of request %s", ex.request_id)
            return
        assert self.recorder is not None
        if ex.member and ex.plan is not None and ex.plan.sc is not None and ex.program_id:
            verdict = self.programs.decide(ex.program_id, ex.plan.sc)
            if verdict is not None:  # this sample's answer stopped its program
                record.request.update(decision_token=verdict.samples, decision_answer=verdict.answer)
        self.recorder.put(record)
        if ex.plan is not None:
            req = record.request
            # A tagged program has no last sample to compare its verdict with: errors and latency only.
            stop = None if ex.member else decision_of(ex)
            await self.control.judge(ex.plan, ex.status != 200 or ex.error is not None,
                                     ex.finished - ex.started, stop.answer if stop else None,
                                     req["final_answer"], stop is not None)

    def _count(self, path: str, ex: Exchange) -> None:
        endpoint = path if path in OBSERVED or path in ("/v1/models",) else "other"
        self.metrics.requests[(endpoint, ex.status)] += 1
        self.metrics.duration.observe(ex.finished - ex.started)

    @staticmethod
    async def _respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Departure:
    """Watches for the client going away; then cancels the task serving it."""

    def __init__(self, receive: Receive) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._me = me
        self.gone = False
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._me.cancel()

    def left(self, ex: Exchange) -> None:
        """Called on cancellation: a departed client ends the request; anything else goes on."""
        if not self.gone:
            raise asyncio.CancelledError
        self._me.uncancel()
        ex.error, ex.status = "client disconnected", 499

    def stop(self) -> None:
        self._watcher.cancel()


def create_app(
    settings: Settings,
    upstream: Upstream | None = None,
    write: Callable[[Sequence[Record]], None] | None = None,
) -> ProxyApp:
    """The proxy; `upstream` and `write` replace the HTTP upstream and the store (tests)."""
    return ProxyApp(settings, upstream, write)


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object, or None (it is still forwarded untouched)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _verdict_stop(verdict: Verdict) -> StopInfo:
    return StopInfo(verdict.samples, verdict.answer, f"program decided: {verdict.reason}")


def _wants_usage(ex: Exchange) -> bool:
    """Whether the response the client gets carries usage (a whole one always does)."""
    body = ex.body or {}
    options = body.get("stream_options")
    return not body.get("stream") or (isinstance(options, dict) and bool(options.get("include_usage")))


def _assemblable(body: dict[str, Any], mode: Mode) -> bool:
    """Whether a non-streamed request is answered from an upstream stream so the policy can
    watch it: in shadow and enforce, unless it asks for what the proxy does not assemble."""
    return mode in ("shadow", "enforce") and not any(
        body.get(name) for name in ("tools", "functions", "logprobs", "top_logprobs", "echo"))


def _header(headers: Headers, name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def _probe_headers(headers: Headers) -> Headers:
    """Probes carry the client's credentials, nothing else of its request."""
    out: Headers = [(b"content-type", b"application/json")]
    auth = _header(headers, b"authorization")
    if auth is not None:
        out.append((b"authorization", auth.encode("latin-1")))
    return out
