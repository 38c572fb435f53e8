"""Rollout control inside the proxy: which treatment each request gets, kept current.

The rollout state lives in the store (`proxy.control.rollout`); every `poll_s` the
proxy reloads it in a worker thread, so a change made by `dynasorctl rollout`
(or the admin API, or another proxy's guardrail) reaches every proxy process on
that store within a second. With no rollout state in the store, the proxy's own
flags (`--mode`, `--policy`, `--enforce-percent`) are the "*" scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from proxy.control import rollout
from proxy.control.guardrails import Guardrails
from proxy.core.policy import (
    CotPolicy,
    PolicyFile,
    PolicyFileError,
    ScPolicy,
    load_policy_file,
    parse_policy_file,
    select_policy,
)
from proxy.core.treatment import Mode, choose
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.store.secrets import ROLLOUT_SALT, shared_secret

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's treatment: its rollout scope, mode and policy."""

    scope: str
    mode: Mode
    policy: CotPolicy | None  # for single-sample requests
    policy_name: str | None
    scope_mode: str = "observe"  # what the scope is set to (enforce covers shadowed requests too)
    sc: ScPolicy | None = None  # for requests of several samples (n > 1)


def key_name(authorization: str | None) -> str | None:
    """An API key's name for rollout scopes: the first 12 hex digits of its SHA-256."""
    if not authorization:
        return None
    token = authorization.removeprefix("Bearer ").strip()
    return hashlib.sha256(token.encode()).hexdigest()[:12] if token else None


class Control:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.guardrails = Guardrails(settings.guardrails)
        # Read now, so a bad policy file stops start-up with its own message.
        self._flag_policies: list[PolicyFile] = (
            [load_policy_file(settings.policy_file)] if settings.policy_file else []
        )
        self.state: rollout.RolloutState | None = None
        self._parsed: dict[int, PolicyFile | None] = {}
        self._engine: Engine | None = None
        self._task: asyncio.Task[None] | None = None
        self.poll_error: str | None = None
        # Keys the rollout hash. Without a store (tests), one of this process's own.
        self._salt = os.urandom(32)

    async def start(self, engine: Engine) -> None:
        self._engine = engine
        # Shared through the store, so every proxy on it puts a program in the same group.
        self._salt = await asyncio.to_thread(shared_secret, engine, ROLLOUT_SALT)
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="dynasor-rollout-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def refresh(self) -> None:
        """Load the rollout state now (in a worker thread)."""
        if self._engine is None:
            return
        try:
            state = await asyncio.to_thread(rollout.load_state, self._engine)
        except SQLAlchemyError as exc:
            self.poll_error = str(exc).splitlines()[0]
            log.error("cannot read the rollout state (keeping the last one): %s", self.poll_error)
            return
        self.poll_error = None
        if self.state is None or state.version != self.state.version:
            if self.state is not None:
                log.info("rollout state changed (version %s)", state.version)
            self.state = state
            self.guardrails.scopes.clear()  # a new rollout is judged afresh

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rollout_poll_s)
            await self.refresh()

    def plan(self, model: str | None, authorization: str | None, program_key: str,
             opt: str | None, samples: int = 1, tagged: bool = False) -> Plan:
        """The treatment of one request of `samples` samples (pure: no I/O).

        A scope's policy is a chain-of-thought policy (it governs single-sample
        requests) or a self-consistency one (requests of several samples, and the
        samples of programs `tagged` by header); requests it does not govern stay
        in observe.
        """
        scope_state = (rollout.resolve(self.state, model, key_name(authorization))
                       if self.state is not None and self.state.scopes else None)
        if scope_state is None:
            scope, scope_mode, percent = "*", self.settings.mode, self.settings.enforce_percent
            chosen = select_policy(self._flag_policies, model)
            name = self.settings.policy_file
        else:
            scope, scope_mode, percent = scope_state.scope, scope_state.mode, scope_state.percent
            chosen = self._policy(scope_state)
            name = f"policy {scope_state.policy_id}" if scope_state.policy_id is not None else None
        if chosen is not None and not chosen.applies_to(model):
            chosen = None
        policy = chosen.cot if chosen is not None and samples == 1 else None
        sc = chosen.sc if chosen is not None and (samples > 1 or tagged) else None
        mode = choose(scope_mode, percent, program_key, opt, self.settings.allow_opt_in,  # type: ignore[arg-type]
                      self._salt)
        if mode in ("shadow", "enforce") and policy is None and sc is None:
            mode = "observe"
        watch = self.guardrails.scopes.get(scope)
        if mode == "enforce" and watch is not None and watch.tripped:
            mode = "shadow"  # tripped here: do not wait for the store to say so
        return Plan(scope, mode, policy, name if mode in ("shadow", "enforce") else None, scope_mode, sc)

    def _policy(self, s: rollout.ScopeState) -> PolicyFile | None:
        if s.policy_id is None or s.policy_toml is None:
            return None
        if s.policy_id not in self._parsed:
            try:
                self._parsed[s.policy_id] = parse_policy_file(s.policy_toml, f"policy {s.policy_id}")
            except PolicyFileError as exc:
                log.error("%s; scope %s stays in observe", exc, s.scope)
                self._parsed[s.policy_id] = None
        return self._parsed[s.policy_id]

    async def judge(self, plan: Plan, error: bool, latency_s: float, decision_answer: str | None,
                    final_answer: str | None, decided: bool) -> None:
        """Feed one finished request to the guardrails; roll the scope back if it trips them."""
        breach = self.guardrails.observe(plan.scope, plan.mode, error, latency_s, decision_answer,
                                         final_answer, decided)
        if breach is None or plan.scope_mode != "enforce":
            return  # nothing to roll back: the breach still shows on /health
        self.metrics.rollbacks += 1
        log.error("guardrail tripped for scope %s: %s; falling back to shadow", plan.scope, breach)
        if self._engine is None or self.state is None or not self.state.scopes:
            return  # flag-configured: the local fallback above is all there is
        try:
            await asyncio.to_thread(rollout.rollback, self._engine, plan.scope,
                                    reason=f"guardrail: {breach}")
        except (SQLAlchemyError, rollout.RolloutError) as exc:
            log.error("could not record the rollback of scope %s: %s", plan.scope, exc)
