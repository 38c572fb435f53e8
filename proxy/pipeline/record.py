"""From an exchange and its observed outcome to the rows the store keeps."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from proxy.core.certaindex import extract_boxed
from proxy.core.policy import StopInfo
from proxy.pipeline.dialect import assistant_prefix
from proxy.pipeline.observe import ChoiceText, Outcome
from proxy.pipeline.programs import FinishedSample
from proxy.store.recorder import Record

if TYPE_CHECKING:
    from proxy.pipeline.app import Exchange, ProxyApp
    from proxy.pipeline.probe import ProbeResult


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def final_answer(choice: ChoiceText) -> str | None:
    """The boxed answer of a finished generation: in the answer, else in the reasoning."""
    return extract_boxed(choice.content_text) or extract_boxed(choice.reasoning_text)


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    """The prompt as stored (and hashed): chat messages as JSON, or the completion prompt."""
    if kind == "chat":
        return json.dumps(body.get("messages"), ensure_ascii=False)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def prompt_hash(kind: str, body: dict[str, Any]) -> str:
    return _sha(prompt_text(kind, body))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def bare_record(ex: Exchange, upstream: str, error: str) -> Record:
    """What is known of a request whose whole record could not be built."""
    body = ex.body or {}
    return Record({
        "id": ex.request_id, "created_at": datetime.now(UTC), "model": _text(body.get("model")),
        "kind": ex.kind, "upstream": upstream, "mode": ex.mode, "stream": bool(body.get("stream")),
        "status_code": ex.status, "error": ex.error or error,
        "latency_ms": (ex.finished - ex.started) * 1000, "program_id": ex.program_id,
    })


def decision_of(ex: Exchange) -> StopInfo | None:
    """Where the policy stopped (or would have): a probe position, or for a request of several
    samples the number of answers it had read."""
    if ex.program is not None:
        p = ex.program
        return StopInfo(p.decided_at, p.answer, p.reason) if p.decided_at is not None else None
    if ex.member:
        return ex.enforced
    return ex.probes.stop if ex.probes else None


def probes_of(ex: Exchange) -> list[tuple[int, ProbeResult]]:
    """(choice, probe): a request's own probes, or the check probes of its samples (by start order)."""
    if ex.program is not None:
        return ex.program.checks
    return [(0, p) for p in ex.probes.results] if ex.probes else []


async def build_record(ex: Exchange, outcome: Outcome | None, app: ProxyApp) -> Record:
    body = ex.body or {}
    now = datetime.now(UTC)
    choices = outcome.choices if outcome else {}
    first = choices.get(0)
    # The thinking back in its block, as the model wrote it (and as the probes continue it), so a
    # reasoning parser's split does not hide `</think>` from calibration's text signals.
    completion = assistant_prefix(first.reasoning_text, first.content_text) if first else ""
    tokens = outcome.completion_tokens if outcome else None
    if tokens is None and choices:
        tokens = sum(c.tokens for c in choices.values())
    if tokens:
        app.metrics.main_tokens += tokens
    probes = probes_of(ex)
    stop = decision_of(ex)
    if stop is not None and ex.enforced is None:
        app.metrics.shadow_stops += 1
    prompt = prompt_text(ex.kind, body)
    store_text = app.settings.store_text
    request: dict[str, Any] = {
        "id": ex.request_id,
        "created_at": now,
        "model": (outcome.model if outcome and outcome.model else None) or _text(body.get("model")),
        "kind": ex.kind,
        "upstream": app.upstream.base_url,
        "mode": ex.mode,
        "policy": ex.plan.policy_name if ex.plan else None,
        "decision_token": stop.position if stop else None,
        "decision_answer": stop.answer if stop else None,
        "stop_source": stop.source if stop and ex.program is None and not ex.member else None,
        "enforced": ex.enforced is not None,
        "stream": bool(body.get("stream")),
        "n": body.get("n") if isinstance(body.get("n"), int) else 1,
        "status_code": ex.status,
        "error": ex.error or (outcome.error if outcome else None),
        "prompt_tokens": outcome.prompt_tokens if outcome else None,
        "completion_tokens": tokens,
        "finish_reason": first.finish_reason if first else None,
        "final_answer": (ex.program.final_answer if ex.program is not None
                         else final_answer(first) if first else None),
        "latency_ms": (ex.finished - ex.started) * 1000,
        "ttft_ms": ex.ttft_s * 1000 if ex.ttft_s is not None else None,
        "program_id": ex.program_id,
        "probed": ex.probes is not None or bool(probes),
        "probe_count": sum(1 for _, p in probes if p.status == "ok"),
        "probe_tokens": sum(p.output_tokens for _, p in probes),
        "prompt_hash": _sha(prompt),
        "completion_hash": _sha(completion) if first else None,
        "prompt_text": prompt if store_text else None,
        "completion_text": completion if store_text and first else None,
    }
    probe_rows = [
        {
            "request_id": ex.request_id,
            "choice_index": choice,
            "position": p.position,
            "answer": p.answer,
            "hesitant": p.hesitant,
            "output_tokens": p.output_tokens,
            "latency_ms": p.latency_ms,
            "status": p.status,
            "certaindex": p.certaindex,
            "confidence": p.confidence,
            "kind": p.kind,
            "trigger_position": p.trigger_position,
        }
        for choice, p in probes
    ]
    sample_rows: list[dict[str, Any]] = []
    # A sample the proxy ended with its program's verdict adds no answer of its own.
    verdict_answered = ex.member and ex.enforced is not None
    if ex.program_id is not None and outcome is not None and ex.status == 200 and not verdict_answered:
        finished = [
            FinishedSample(i, final_answer(choices[i]), None if len(choices) > 1 else tokens,
                           choices[i].finish_reason)
            for i in outcome.finish_order
        ]
        for s in await app.programs.add(ex.program_id, finished):
            sample_rows.append({
                "program_id": ex.program_id,
                "request_id": ex.request_id,
                "choice_index": s.sample.choice_index,
                "sample_index": s.sample_index,
                "answer": s.sample.answer,
                "answer_group": s.answer_group,
                "completion_tokens": s.sample.completion_tokens or choices[s.sample.choice_index].tokens or None,
                "finish_reason": s.sample.finish_reason,
                "certaindex": s.certaindex,
                "created_at": now,
            })
    return Record(request, probe_rows, sample_rows)
