"""Guardrails: the enforced group watched against the shadow group, with automatic rollback.

Per rollout scope the proxy keeps the last `window` requests of each group.
Answers changed are measured where the unstopped answer is known: in the
shadow group, whose requests ran to the end beside the policy's decision. Upstream
errors and latency are compared between the groups. A bound breached over at
least `min_sample` requests trips the guardrail: the scope falls back to shadow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

from pydantic import BaseModel, Field

from proxy.core.certaindex import normalize_answer


class GuardrailSettings(BaseModel):
    window: int = Field(500, ge=10, description="recent requests kept per group")
    min_sample: int = Field(50, ge=1, description="requests per group before any bound is judged")
    max_answer_change: float = Field(
        0.05, ge=0.0, le=1.0, description="share of shadow decisions whose answer differs from the final"
    )
    max_error_increase: float = Field(
        0.02, ge=0.0, le=1.0, description="enforced error rate minus shadow error rate"
    )
    max_latency_ratio: float = Field(1.5, gt=0.0, description="enforced median latency / shadow median")


@dataclass
class _Group:
    errors: deque[bool]
    latency: deque[float]
    changed: deque[bool]


def _group(window: int) -> _Group:
    return _Group(deque(maxlen=window), deque(maxlen=window), deque(maxlen=window))


@dataclass
class ScopeWatch:
    enforced: _Group
    shadow: _Group
    tripped: str | None = None


@dataclass
class Guardrails:
    settings: GuardrailSettings
    scopes: dict[str, ScopeWatch] = field(default_factory=dict)

    def _watch(self, scope: str) -> ScopeWatch:
        if scope not in self.scopes:
            w = self.settings.window
            self.scopes[scope] = ScopeWatch(_group(w), _group(w))
        return self.scopes[scope]

    def observe(self, scope: str, mode: str, error: bool, latency_s: float,
                decision_answer: str | None, final_answer: str | None, decided: bool) -> str | None:
        """Count one finished request; the breach, if this one tripped the scope's guardrail."""
        if mode not in ("shadow", "enforce"):
            return None
        watch = self._watch(scope)
        group = watch.enforced if mode == "enforce" else watch.shadow
        group.errors.append(error)
        group.latency.append(latency_s)
        if mode == "shadow" and decided and not error:
            group.changed.append(normalize_answer(decision_answer) != normalize_answer(final_answer))
        if watch.tripped is None:
            watch.tripped = self.breach(watch)
            return watch.tripped
        return None

    def breach(self, watch: ScopeWatch) -> str | None:
        s = self.settings
        shadow, enforced = watch.shadow, watch.enforced
        if len(shadow.changed) >= s.min_sample:
            share = sum(shadow.changed) / len(shadow.changed)
            if share > s.max_answer_change:
                return (f"answers changed in {share:.1%} of {len(shadow.changed)} shadow decisions "
                        f"(bound {s.max_answer_change:.1%})")
        if len(enforced.errors) >= s.min_sample and len(shadow.errors) >= s.min_sample:
            rise = sum(enforced.errors) / len(enforced.errors) - sum(shadow.errors) / len(shadow.errors)
            if rise > s.max_error_increase:
                return f"upstream errors {rise:+.1%} in the enforced group (bound {s.max_error_increase:+.1%})"
            ratio = median(enforced.latency) / max(median(shadow.latency), 1e-9)
            if ratio > s.max_latency_ratio:
                return f"enforced median latency {ratio:.2f}x the shadow group's (bound {s.max_latency_ratio:g}x)"
        return None

    def reset(self, scope: str) -> None:
        """Forget a scope's statistics (its rollout changed)."""
        self.scopes.pop(scope, None)

    def status(self) -> dict[str, dict[str, object]]:
        return {
            scope: {
                "tripped": w.tripped,
                "enforced": len(w.enforced.errors),
                "shadow": len(w.shadow.errors),
                "shadow_decisions": len(w.shadow.changed),
                "answer_change": (sum(w.shadow.changed) / len(w.shadow.changed)) if w.shadow.changed else None,
            }
            for scope, w in self.scopes.items()
        }
