"""The responses the proxy writes itself when it enforces a policy.

The end of a stream it stopped, a whole completion assembled from a stream it
watched, the answer of a decided program, and the response of a request whose
samples it generated: each in the upstream's own shape, with a `dynasor` field
saying what happened.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from proxy.core.policy import StopInfo
from proxy.metrics import Metrics
from proxy.pipeline.assemble import SampleStream, Usage, choice_body, completion
from proxy.pipeline.enforce import answer_text, stop_extension, tail_chunks, verdict_extension
from proxy.pipeline.exchange import (
    ENFORCED,
    JSON_HEADERS,
    Exchange,
    Send,
    probe_headers,
    respond,
    wants_usage,
    written_headers,
)
from proxy.pipeline.observe import ChoiceText
from proxy.pipeline.programs import Programs, Verdict
from proxy.pipeline.record import decision_of
from proxy.pipeline.samples import ProgramResult, Sample, program_extension
from proxy.pipeline.sse import error_body, error_frame
from proxy.settings import Settings
from proxy.upstream.base import Headers, Upstream, UpstreamError, forwardable

log = logging.getLogger(__name__)


def verdict_stop(verdict: Verdict) -> StopInfo:
    """A decided program's verdict as the stop of one of its samples."""
    return StopInfo(verdict.samples, verdict.answer, f"program decided: {verdict.reason}")


class Endings:
    """Writes what the client gets where the proxy, not the upstream, ends a response."""

    def __init__(self, settings: Settings, metrics: Metrics, upstream: Upstream, programs: Programs) -> None:
        self.settings = settings
        self.metrics = metrics
        self.upstream = upstream
        self.programs = programs

    def stop_now(self, ex: Exchange) -> StopInfo | None:
        """Whether an enforced request must end now: its policy fired, or its program's did."""
        if ex.probes is not None and ex.probes.enforcing:
            return ex.probes.stop
        verdict = self.programs.verdict(ex.program_id) if ex.member and ex.program_id else None
        return verdict_stop(verdict) if verdict is not None else None

    def extension(self, ex: Exchange, tokens: int) -> dict[str, Any]:
        assert ex.enforced is not None
        return (verdict_extension if ex.member else stop_extension)(ex.enforced, tokens)

    async def from_verdict(self, send: Send, ex: Exchange, verdict: Verdict) -> None:
        """A sample of a decided program, answered with the program's answer and generating nothing."""
        assert ex.body is not None
        ex.enforced, ex.status, ex.finished = verdict_stop(verdict), 200, time.perf_counter()
        self.metrics.enforced_stops += 1
        envelope = {"id": f"dynasor-{ex.request_id}", "created": int(time.time()), "model": ex.body.get("model")}
        text = answer_text(verdict.answer, self.settings.answer_template, "")
        prompt_tokens = await self.prompt_tokens(ex) if wants_usage(ex) else None
        extension = verdict_extension(ex.enforced, 0)
        if ex.body.get("stream"):
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), ENFORCED]
            body = tail_chunks(ex.kind, envelope, text, extension, 0, prompt_tokens, wants_usage(ex))
        else:
            headers = [*JSON_HEADERS, ENFORCED]
            part = choice_body(ex.kind, 0, ChoiceText(0), None, text.lstrip("\n"), "stop")
            body = completion(ex.kind, envelope, [part], Usage(prompt_tokens, 0), extension)
        await respond(send, 200, body, headers)

    async def program(self, send: Send, ex: Exchange, result: ProgramResult, stream: SampleStream | None,
                      started: bool) -> None:
        """The response of a request of several samples, once they are done (see proxy.pipeline.samples)."""
        enforcing = ex.mode == "enforce"
        if result.failed is not None:
            await self.program_failed(send, ex, result.failed, started)
            return
        ex.status = 200
        if enforcing and result.decided_at is not None and len(result.finished) < result.requested:
            self.metrics.enforced_stops += 1
            ex.enforced = decision_of(ex)
        extension = program_extension(result) if enforcing else None
        usage = Usage(result.prompt_tokens, result.generated_tokens)
        if stream is not None:
            include = wants_usage(ex)
            await send({"type": "http.response.body", "body": stream.end(usage if include else None, extension),
                        "more_body": False})
            return
        first = result.finished[0].observer
        choices = [choice_body(ex.kind, i, s.observer.finish().choices[0], s.observer.reasoning_field)
                   for i, s in enumerate(result.finished)]
        await respond(send, 200, completion(ex.kind, first.envelope, choices, usage, extension),
                      written_headers(result.finished[0].headers, enforcing, JSON_HEADERS))

    async def program_failed(self, send: Send, ex: Exchange, failed: Sample, started: bool) -> None:
        """A sample the upstream failed fails the request, as it would have failed upstream."""
        ex.status, ex.error = failed.status if failed.status != 200 else 502, failed.error
        if started:
            await send({"type": "http.response.body", "body": error_frame(failed.error or "upstream error"),
                        "more_body": False})
        elif failed.error_body:
            await respond(send, failed.status, failed.error_body, forwardable(failed.headers))
        else:
            await respond(send, ex.status, error_body(failed.error or "upstream error", "upstream_error",
                                                            ex.status), JSON_HEADERS)

    async def stopped_text(self, ex: Exchange) -> tuple[int, str, int | None]:
        """For a stopped request: tokens generated, the text that ends it, the prompt's tokens."""
        assert ex.observer is not None and ex.enforced is not None and ex.body is not None
        self.metrics.enforced_stops += 1
        choice = ex.observer.live_choice(0)
        text = answer_text(ex.enforced.answer, self.settings.answer_template,
                           choice.content_text if choice else "")
        prompt_tokens = await self.prompt_tokens(ex) if wants_usage(ex) else None
        return (choice.tokens if choice else 0), text, prompt_tokens

    async def tail(self, ex: Exchange) -> bytes:
        """The end of a stream the policy stopped: the answer, finish_reason stop, [DONE]."""
        assert ex.observer is not None and ex.enforced is not None and ex.body is not None
        tokens, text, prompt_tokens = await self.stopped_text(ex)
        return tail_chunks(ex.kind, ex.observer.envelope, text, self.extension(ex, tokens), tokens,
                           prompt_tokens, wants_usage(ex))

    async def whole(self, send: Send, ex: Exchange, headers: Headers) -> None:
        """The completion a non-streamed request asked for, from the stream the proxy watched."""
        assert ex.observer is not None
        outcome = ex.observer.finish()
        if ex.error is not None or outcome.error is not None:
            ex.status = 502
            message = ex.error or f"upstream error mid-generation: {outcome.error}"
            await respond(send, 502, error_body(message, "upstream_error", 502), headers)
            return
        choice = ex.observer.live_choice(0) or ChoiceText(0)
        field = ex.observer.reasoning_field
        if ex.enforced is not None:
            tokens, text, prompt_tokens = await self.stopped_text(ex)
            part = choice_body(ex.kind, 0, choice, field, text, "stop")
            body = completion(ex.kind, ex.observer.envelope, [part], Usage(prompt_tokens, tokens),
                              self.extension(ex, tokens))
        else:
            tokens = outcome.completion_tokens if outcome.completion_tokens is not None else choice.tokens
            body = completion(ex.kind, ex.observer.envelope, [choice_body(ex.kind, 0, choice, field)],
                              Usage(outcome.prompt_tokens, tokens))
        await respond(send, 200, body, headers)

    async def prompt_tokens(self, ex: Exchange) -> int | None:
        """The prompt's token count, from a one-token request (the prefix cache makes it cheap)."""
        assert ex.body is not None
        body = {k: v for k, v in ex.body.items() if k not in ("stream", "stream_options", "n")}
        body.update({"max_tokens": 1, "stream": False})
        body.pop("max_completion_tokens", None)
        path = "/v1/chat/completions" if ex.kind == "chat" else "/v1/completions"
        try:
            resp = await self.upstream.send("POST", path, probe_headers(ex.client_headers, ex.program_key,
                                                                        ex.affinity),
                                            json.dumps(body).encode())
            try:
                data = json.loads(b"".join([c async for c in resp.chunks()]))
            finally:
                await resp.aclose()
            return int(data["usage"]["prompt_tokens"])
        except (UpstreamError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not count the prompt's tokens for usage: %s", exc)
            return None
