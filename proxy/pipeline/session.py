"""One request's probes, the text it watches, and its policy's decision (live).

The session reads the main choice as it grows (`proxy.core.live_text`) and takes,
never after `</think>` (probes there return fragments):

- periodic probes: on the policy's schedule (`probe_due`, capped by `max_probes`),
  and in observe and shadow every `probe_interval` tokens as well;
- statement probes: at a position where `statement_due` says the policy checks an
  answer the thinking stated;
- trials (DEER) at the first `max_trials` transition words: the text before the word
  continued with the trigger's inducer; in observe (and shadow, unless the policy has
  a transition trigger) at the proxy's `trial_words` with DEER's settings;
- with a policy, the answer statements and the end of thinking as observations.

Each probe is taken with its own settings (`probe.how_to_probe`), one request's one at
a time, the earliest due first. With a policy, every observation goes to `decide_cot`
in causal order, as the replay puts them: an observation is decided only once nothing
can still arrive before it (a probe in flight or waiting, a word not yet complete,
a token not yet read), so the live stop is the replay's first stop. The first stop is
kept in `stop` (shadow: only recorded; enforcing: the relay ends the stream). An
enforcing session probes only where the policy wants a probe.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.core.certaindex import probe_certaindex
from proxy.core.live_text import LiveText, StatementReader, ThinkEndReader, TransitionReader
from proxy.core.policy import (
    TRIAL_SETTINGS,
    CotPolicy,
    Observation,
    ProbeObservation,
    StatementObservation,
    StopInfo,
    ThinkEndObservation,
    causal_key,
    decide_cot,
    probe_due,
    statement_due,
    text_signals,
)
from proxy.pipeline.observe import ChoiceText
from proxy.pipeline.probe import HowToProbe, ProbeKind, Prober, ProbeResult, how_to_probe
from proxy.upstream.base import Headers, UpstreamError

log = logging.getLogger(__name__)

# Probes that may wait for the one in flight; past this the upstream is too slow for
# the probe schedule and further ones are skipped (and counted).
MAX_WAITING = 8

Key = tuple[int, int]  # an observation's causal key: (position, rank)


@dataclass(order=True)
class _Job:
    key: Key
    seq: int
    prefix: str = field(compare=False)
    how: HowToProbe = field(compare=False)
    kind: ProbeKind = field(compare=False)
    trigger: int | None = field(compare=False)


@dataclass(frozen=True, slots=True)
class _Trials:
    words: tuple[str, ...]
    max_trials: int
    how: HowToProbe


class ProbeSession:
    """The probes of one request's main choice, and the policy's decision on them."""

    def __init__(self, prober: Prober, kind: str, request: dict[str, Any], headers: Headers,
                 policy: CotPolicy | None = None, enforcing: bool = False,
                 program: str | None = None) -> None:
        """`program`: the program the probed request belongs to, told each probe's certaindex."""
        self._prober = prober
        self._program = program
        self._kind = kind
        self._request = request
        self._headers = headers
        self.policy = policy
        self.enforcing = enforcing and policy is not None
        settings = prober.settings
        self._how = how_to_probe(policy.probe if policy else None, settings)
        self._every = None if self.enforcing else settings.probe_interval
        rule = policy.transition if policy is not None else None
        if rule is not None:
            self._trials: _Trials | None = _Trials(rule.words, rule.max_trials,
                                                   how_to_probe(rule.probe, settings))
        elif not self.enforcing and settings.trial_words and settings.trial_max:
            self._trials = _Trials(tuple(settings.trial_words), settings.trial_max,
                                   how_to_probe(TRIAL_SETTINGS, settings))
        else:
            self._trials = None
        self._text = LiveText()
        self._read = 0  # chunks of the choice read into the text
        self._think = ThinkEndReader()
        self._said = StatementReader() if policy is not None and policy.statement else None
        self._words = TransitionReader(self._trials.words) if self._trials else None
        self._words_seen = 0
        self._waiting: list[_Job] = []
        self._running: _Job | None = None
        self._started: float | None = None  # perf_counter() when the running probe was sent
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self._periodic = 0  # periodic probes taken (the policy's `max_probes`)
        self._ended = False
        self._failed = False  # a bug stopped the watching (logged): record what was seen
        self._obs: list[Observation] = []  # resolved observations, in causal order
        self._decided = 0  # how many of them were put to the decision function
        self.results: list[ProbeResult] = []
        self.stop: StopInfo | None = None

    # -- what the observer must call back for ---------------------------------------------

    def interval(self, probe_interval: int) -> int:
        """How often the observer must call back so no probe point of the session is missed."""
        policy = self.policy
        if self.enforcing and policy is not None and (policy.transition or policy.think_end):
            return 1  # a word or `</think>` acted on as soon as it is written
        steps = [] if self.enforcing else [probe_interval]
        if policy is not None and policy.periodic:
            steps += [policy.interval, policy.early_interval or policy.interval]
        if policy is not None and policy.statement:
            steps.append(policy.statement.align)
        return math.gcd(*steps) if steps else probe_interval

    # -- the main choice grows --------------------------------------------------------------

    def on_tokens(self, choice: ChoiceText) -> None:
        """Observer callback: read the new tokens, take what is due, decide what can be."""
        if self.stop is not None or self._failed:
            return
        try:
            self._consume(choice)
            position = self._text.tokens
            if self._think.at is None:
                self._watch_text(position)
                if self._think.at is None:
                    self._probe_at(position)
            self._decide()
        except Exception:  # a bug here must not break the client's stream: stop watching
            log.exception("watching the stream failed; no more probes for this request")
            self._failed = True

    def _consume(self, choice: ChoiceText) -> None:
        for i in range(self._read, len(choice.content)):
            self._text.add(choice.content[i], choice.reasoning[i] if self._kind == "chat" else "")
        self._read = len(choice.content)

    def _watch_text(self, position: int) -> None:
        """Transition words, answer statements and the end of thinking in the new text."""
        closed = self._think.read(self._text)
        end = self._think.at
        if self._words is not None and self._trials is not None:
            for at in self._words.read(self._text):
                if end is not None and at >= end:
                    break
                if self._words_seen < self._trials.max_trials:
                    self._words_seen += 1
                    self._take(self._text.position(at), 2, self._text.text()[:at],
                               self._trials.how, "trial", position)
        if self._said is not None and self.policy is not None and self.policy.statement and (
                position % self.policy.statement.align == 0 or closed is not None):
            for s in self._said.read(self._text.text()):
                if end is None or s.end <= end:
                    self._add(StatementObservation(self._text.position(s.end), s.answer))
        if closed is not None and self.policy is not None:
            self._add(ThinkEndObservation(self._text.position(closed[0]), closed[1]))

    def _probe_at(self, position: int) -> None:
        """A periodic or statement probe at `position`, if one is due."""
        policy = self.policy
        if position <= 0:
            return
        stated = None
        if policy is not None and policy.statement is not None and (
                position % policy.statement.align == 0):
            stated = statement_due(policy, self._obs, position)
        due = policy is not None and probe_due(policy, position)
        on_policy = due and (policy is not None and (
            policy.max_probes is None or self._periodic < policy.max_probes))
        if stated is None and not on_policy and not (
                self._every is not None and position % self._every == 0):
            return
        if not self.enforcing and self._taken() >= self._prober.settings.probe_max_per_request:
            return
        self._periodic += due  # as the replay counts `max_probes`: every probe on the schedule
        self._take(position, 1, self._text.text(), self._how,
                   "periodic" if stated is None else "statement",
                   None if stated is None else stated.position)

    def _taken(self) -> int:
        return len(self.results) + len(self._waiting) + (self._running is not None)

    # -- probes, one at a time, the earliest first -----------------------------------------

    def _take(self, position: int, rank: int, prefix: str, how: HowToProbe, kind: ProbeKind,
              trigger: int | None) -> None:
        if self._ended:
            return
        if len(self._waiting) >= MAX_WAITING:
            self._prober.metrics.probes["skipped"] += 1  # the upstream cannot keep up
            return
        self._seq += 1
        heapq.heappush(self._waiting, _Job((position, rank), self._seq, prefix, how, kind, trigger))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._work())

    async def _work(self) -> None:
        while self._waiting and self.stop is None and not self._failed:
            self._running = heapq.heappop(self._waiting)
            await self._run(self._running)
            self._running = None
            try:
                self._decide()
            except Exception:
                log.exception("deciding on a probe failed; no more probes for this request")
                self._failed = True

    async def _run(self, job: _Job) -> None:
        metrics = self._prober.metrics
        position = job.key[0]
        self._started = time.perf_counter()
        try:
            result = await self._prober.probe(self._kind, self._request, self._headers,
                                              job.prefix, position, job.how)
        except asyncio.CancelledError:
            raise
        except (UpstreamError, ValueError) as exc:
            log.warning("%s probe at %d tokens failed: %s", job.kind, position, exc)
            metrics.probes["error"] += 1
            self.results.append(ProbeResult(position, None, False, 0, None, "error", kind=job.kind,
                                            trigger_position=job.trigger, started=self._started,
                                            ended=time.perf_counter()))
            return
        metrics.probes["ok"] += 1
        result.kind, result.trigger_position = job.kind, job.trigger
        trial = job.kind == "trial"
        if not trial:  # the paper's agreement, over the probes of the schedule and statements
            ok = [r for r in self.results if r.status == "ok" and r.kind != "trial"] + [result]
            result.certaindex = probe_certaindex([r.answer for r in ok], [r.hesitant for r in ok])
            metrics.observe_certaindex("cot", result.certaindex)
            if self._program is not None:
                self._prober.signals.signal(self._program, result.certaindex)
            if self.policy is not None and self.policy.rule is not None:
                result.signals = text_signals(job.prefix, result.answer)
        self.results.append(result)
        if self.policy is not None:
            self._add(ProbeObservation(position, result.answer, result.hesitant,
                                       result.output_tokens, result.signals, result.confidence,
                                       trial))

    # -- the decision, in causal order -------------------------------------------------------

    def _add(self, observation: Observation) -> None:
        keys = [causal_key(o) for o in self._obs]
        at = bisect.bisect_right(keys, causal_key(observation))
        self._obs.insert(at, observation)
        if at < self._decided:
            # Only a statement read at the next multiple of its `align` lands here; nothing
            # decided after it depends on it (only a probe at that multiple reads statements).
            self._decided += 1

    def _horizon(self) -> Key | None:
        """The least causal key an observation still to come can have (None: none can come)."""
        keys = [j.key for j in self._waiting]
        if self._running is not None:
            keys.append(self._running.key)
        if not self._ended:
            keys.append((self._text.tokens + 1, 0))
            if self._words is not None and self._think.at is None and self._trials is not None \
                    and self._words_seen < self._trials.max_trials:
                keys.append((self._words.bound(self._text), 2))
        return min(keys) if keys else None

    def _decide(self) -> None:
        if self.policy is None or self.stop is not None or self._decided == len(self._obs):
            return
        horizon = self._horizon()
        while self._decided < len(self._obs):
            observation = self._obs[self._decided]
            if horizon is not None and causal_key(observation) >= horizon:
                return
            self._decided += 1
            decision = decide_cot(self.policy, self._obs[: self._decided])
            if decision.stop:
                self.stop = StopInfo(observation.position, decision.answer, decision.reason,
                                     decision.source or "probe")
                self._waiting.clear()
                return

    async def close(self, choice: ChoiceText | None = None) -> None:
        """The main request has ended: cancel the probe in flight; a shadow decides what it saw."""
        self._ended = True  # nothing more is taken
        if choice is not None and self.policy is not None and self.stop is None \
                and self._think.at is None and not self._failed:
            self._consume(choice)
            self._watch_text(self._text.tokens)  # the end of thinking in the last tokens
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._prober.metrics.probes["cancelled"] += 1
            job = self._running
            if job is not None:
                self.results.append(ProbeResult(job.key[0], None, False, 0, None, "cancelled",
                                                kind=job.kind, trigger_position=job.trigger,
                                                started=self._started, ended=time.perf_counter()))
        self._running = None
        self._waiting.clear()
        if not self.enforcing and not self._failed:
            self._decide()
