"""The one chain-of-thought decision function, shared by the live proxy and every replay.

The proxy (live), `dynasorctl calibrate` and `dynasorctl evaluate` (replay) put the
same observations, in causal order, to `decide_cot`, which says whether the policy
stops at the newest one. Which probes and trials a policy takes is decided here too
(`probe_due`, `statement_due`, `taken`), so the proxy probes where the replay assumed
it did, and a probe the policy would not have taken never influences a decision.

Live, along one stream (positions are main tokens generated so far):

- run `proxy.core.text` on the text so far: each new answer statement (inside the
  thinking) becomes a `StatementObservation` at the position where it was complete;
  `</think>` becomes a `ThinkEndObservation` with `think_end(text)`'s answer;
- at each position, probe (with `policy.probe`'s settings) when `probe_due` or
  `statement_due` says so: one probe, even when both do;
- at each transition word (`text.transition_words`, `policy.transition.words`) while
  fewer than `max_trials` trials were taken, take a trial of the text before the word
  (`policy.transition.probe`'s settings; confidence from its logprobs) at the position
  of the word's start;
- after each new observation, call `decide_cot` on every observation up to it, in
  causal order (`observations.causal_key`; a probe's answer arrives later than its
  position, so observations after it in causal order must not be passed with it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from proxy.core.certaindex import normalize_answer
from proxy.core.cot_policy import CotPolicy
from proxy.core.observations import (
    Decision,
    Observation,
    ProbeObservation,
    StatementObservation,
    ThinkEndObservation,
)
from proxy.core.text import TextSignals


def probe_due(policy: CotPolicy, position: int) -> bool:
    """Whether the periodic schedule wants a probe at `position` (ignoring `max_probes`)."""
    if position <= 0 or not policy.periodic:
        return False
    if policy.early_interval is not None and position < policy.dense_from:
        return position % policy.early_interval == 0
    return position % policy.interval == 0


def statement_due(policy: CotPolicy, observations: Sequence[Observation],
                  position: int) -> StatementObservation | None:
    """The statement a probe at `position` checks, if the statement trigger wants one there.

    A statement at token s asks for a probe at the next multiple of `align` (s itself when
    it is one); `observations` are those before the probe (later ones are ignored). The
    probe checks the latest statement before it.
    """
    trigger = policy.statement
    if trigger is None or position <= 0 or position % trigger.align:
        return None
    seen: set[str | None] = set()
    latest: StatementObservation | None = None
    due = False
    for o in observations:
        if not isinstance(o, StatementObservation) or o.position > position:
            continue
        key = normalize_answer(o.answer)
        new = key not in seen
        seen.add(key)
        if o.position > position - trigger.align and (new or not trigger.new_answers_only):
            due = True
        latest = o
    return latest if due else None


def periodic_probes(policy: CotPolicy,
                    observations: Sequence[Observation]) -> list[ProbeObservation]:
    """The periodic probes the policy takes: on its schedule, capped at `max_probes`."""
    used = [o for o in observations if isinstance(o, ProbeObservation) and not o.trial
            and probe_due(policy, o.position)]
    if policy.max_probes is not None:
        used = used[: policy.max_probes]
    return used


# Kept under its first name: the learned rule and the dashboard read the periodic probes.
probes_used = periodic_probes


def trials_taken(policy: CotPolicy,
                 observations: Sequence[Observation]) -> list[ProbeObservation]:
    """The trials the policy takes: those at its first `max_trials` transition words."""
    if policy.transition is None:
        return []
    trials = [o for o in observations if isinstance(o, ProbeObservation) and o.trial]
    return trials[: policy.transition.max_trials]


def taken(policy: CotPolicy, observations: Sequence[Observation]) -> list[ProbeObservation]:
    """Every probe and trial the policy takes among `observations` (their cost is its cost)."""
    periodic = {id(p) for p in periodic_probes(policy, observations)}
    trials = {id(t) for t in trials_taken(policy, observations)}
    out = []
    for i, o in enumerate(observations):
        if not isinstance(o, ProbeObservation):
            continue
        if id(o) in periodic or id(o) in trials or (
                not o.trial and statement_due(policy, observations[:i], o.position) is not None):
            out.append(o)
    return out


def cot_features(used: Sequence[ProbeObservation]) -> dict[str, float]:
    """The learned rule's features after the periodic probes the policy took (oldest first)."""
    last = used[-1]
    key = normalize_answer(last.answer)
    run_start = last.position
    if key is not None:
        for p in reversed(used[:-1]):
            if normalize_answer(p.answer) != key:
                break
            run_start = p.position
    keys = [normalize_answer(p.answer) for p in used]
    same = sum(1 for k in keys if k == key) if key is not None else 0
    distinct = len({k for k in keys if k is not None})
    run = last.position - run_start
    s = last.signals or TextSignals()
    return {
        "run_tokens": run / (run + 1024),
        "answer_share": same / len(used),
        "distinct_answers": distinct / (distinct + 4),
        "position": last.position / (last.position + 4096),
        "think_closed": 1.0 if s.think_closed else 0.0,
        "answer_seen": s.seen_share,
        "hesitations": s.hesitations / (s.hesitations + 2),
        "verifications": s.verifications / (s.verifications + 2),
    }


def _confident(confidence: float | None, least: float | None) -> bool:
    """Whether a confidence gate passes (no gate: yes; gate but nothing measured: no)."""
    return least is None or (confidence is not None and confidence >= least)


def _periodic(policy: CotPolicy, used: list[ProbeObservation]) -> Decision:
    """The agreement rule over the periodic probes taken so far (the newest last)."""
    if policy.hesitation == "exclude":
        window = [p for p in used if not p.hesitant][-policy.window :]
    else:
        window = used[-policy.window :]
    if len(window) < policy.window:
        return Decision(False, reason="window not full")
    if policy.hesitation == "veto" and any(p.hesitant for p in window):
        return Decision(False, reason="hesitant probe in window")
    keys = [normalize_answer(p.answer) for p in window]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return Decision(False, reason="no answers in window")
    key, votes = counts.most_common(1)[0]
    if votes < policy.agree_share * policy.window:
        return Decision(False, reason="answers disagree")
    answer_probe = next(p for p in reversed(window) if normalize_answer(p.answer) == key)
    if not _confident(answer_probe.confidence, policy.min_confidence):
        return Decision(False, reason="agreeing probe not confident")
    if policy.rule is not None and policy.rule.score(cot_features(used)) < (
        policy.rule.logit_threshold
    ):
        return Decision(False, reason="learned rule not confident")
    return Decision(True, answer=answer_probe.answer, reason=f"{votes}/{policy.window} probes "
                    "agree", source="probe")


def _probe(policy: CotPolicy, observations: Sequence[Observation],
           probe: ProbeObservation) -> Decision:
    """A probe with the policy's settings: it may confirm a statement and feed the window."""
    before = observations[:-1]
    stated = statement_due(policy, before, probe.position)
    if stated is not None:
        assert policy.statement is not None
        if normalize_answer(probe.answer) is None or (
                normalize_answer(probe.answer) != normalize_answer(stated.answer)):
            confirmed = Decision(False, reason="probe does not confirm the stated answer")
        elif not _confident(probe.confidence, policy.statement.min_confidence):
            confirmed = Decision(False, reason="confirming probe not confident")
        else:
            return Decision(True, answer=probe.answer, reason="probe confirms the stated answer",
                            source="probe")
    used = periodic_probes(policy, observations)
    if not used or used[-1] is not probe:
        return confirmed if stated is not None else Decision(False, reason="probe not taken")
    return _periodic(policy, used)


def _trial(policy: CotPolicy, observations: Sequence[Observation],
           trial: ProbeObservation) -> Decision:
    """A trial at a transition word: DEER's confidence threshold, or agreeing trials."""
    rule = policy.transition
    trials = trials_taken(policy, observations)
    if rule is None or not trials or trials[-1] is not trial:
        return Decision(False, reason="trial not taken")
    key = normalize_answer(trial.answer)
    if key is None:
        return Decision(False, reason="trial gave no answer")
    if rule.min_confidence is not None and _confident(trial.confidence, rule.min_confidence):
        return Decision(True, answer=trial.answer, source="trial",
                        reason=f"trial confidence {trial.confidence:.6f}")
    if rule.agree is not None:
        recent = trials[-rule.agree :]
        if len(recent) == rule.agree and all(
                normalize_answer(t.answer) == key
                and _confident(t.confidence, rule.agree_confidence) for t in recent):
            return Decision(True, answer=trial.answer, source="trial",
                            reason=f"{rule.agree} confident trials agree")
    return Decision(False, reason="trial not confident")


def decide_cot(policy: CotPolicy, observations: Sequence[Observation]) -> Decision:
    """Whether the policy stops at the newest observation, given those before it.

    `observations` are in causal order (`observations.causal_key`), oldest first; a plain
    list of probes is a valid sequence too.
    """
    if not observations:
        return Decision(False, reason="no probe yet")
    last = observations[-1]
    if last.position < policy.min_tokens:
        return Decision(False, reason="before min_tokens")
    if isinstance(last, ThinkEndObservation):
        if not policy.think_end:
            return Decision(False, reason="end of thinking not used")
        if last.answer is None or normalize_answer(last.answer) is None:
            return Decision(False, reason="no answer stated in the thinking")
        return Decision(True, answer=last.answer, reason="end of thinking", source="text")
    if isinstance(last, StatementObservation):
        return Decision(False, reason="a statement alone never stops: it is probed")
    if last.trial:
        return _trial(policy, observations, last)
    return _probe(policy, observations, last)


def first_stop(
    policy: CotPolicy, observations: Sequence[Observation]
) -> tuple[int | None, Decision]:
    """Replay observations in order; the index of the one at which the policy stops (or None)."""
    for i in range(len(observations)):
        decision = decide_cot(policy, observations[: i + 1])
        if decision.stop:
            return i, decision
    return None, Decision(False, reason="never stopped")
