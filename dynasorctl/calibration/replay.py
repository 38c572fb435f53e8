"""Vectorised replay of chain-of-thought policies over a probe table.

`Replayer.stops(policy)` gives, for every run, the observation at which `decide_cot`
would first stop it. It is a second implementation of the same rule, built for
speed (hundreds of policies over hundreds of thousands of probes); the tests hold
it to the one decision function, `proxy.policy.first_stop`, observation for
observation. The periodic agreement rule is replayed here, the other triggers in
`triggers.py`. Rules it cannot vectorise (a window whose agreeing share is not a
strict majority, a confidence gate on periodic probes) are replayed through
`first_stop` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dynasorctl.calibration import triggers
from dynasorctl.calibration.table import PROBE_PROMPT_COST, ProbeTable
from dynasorctl.calibration.triggers import NEVER, Combined, Hits
from proxy.core.certaindex import normalize_answer
from proxy.core.policy import CotPolicy, ProbeObservation, StopRule, first_stop, taken

SOURCES = {triggers.PROBE: "probe", triggers.TRIAL: "trial", triggers.TEXT: "text"}


@dataclass(frozen=True, slots=True)
class Stops:
    """Where one policy stops each run, and what its probes and trials cost."""

    row: np.ndarray  # int64 per run: probe row of a stop at a probe, else -1
    key: np.ndarray  # int64 per run: answer id given at the stop, -1 when none
    probes: np.ndarray  # int64 per run: probes and trials the policy took
    cost: np.ndarray  # int64 per run: their decoded tokens plus prompt cost
    decoded: np.ndarray  # int64 per run: their decoded tokens
    pos: np.ndarray  # int64 per run: main tokens at the stop, -1 when it never stops
    source: np.ndarray  # int64 per run: triggers.PROBE, TRIAL, TEXT, or NONE

    @property
    def stopped(self) -> np.ndarray:
        return self.pos >= 0


@dataclass(slots=True)
class _Used:
    rows: np.ndarray  # probe rows the policy takes, in order
    run: np.ndarray
    pos: np.ndarray
    key: np.ndarray
    hesitant: np.ndarray
    first: np.ndarray  # per run: index in `rows` of its first used probe
    last: np.ndarray  # per run: index of its last used probe (first - 1 when none)
    cost: np.ndarray  # inclusive cumulative probe cost
    decoded: np.ndarray  # inclusive cumulative decoded tokens


def _group_rank(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order of `values` and each element's rank among equal values seen before it."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    new = np.ones(len(order), bool)
    new[1:] = sorted_values[1:] != sorted_values[:-1]
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - starts[group]
    return order, rank


class Replayer:
    """Replays policies over one table, caching what policies share."""

    def __init__(self, table: ProbeTable) -> None:
        self.t = table
        self._used: dict[tuple, _Used] = {}
        self._windows: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._features: dict[tuple, dict[str, np.ndarray]] = {}
        self._scores: dict[tuple, np.ndarray] = {}

    # --- the probes a policy takes --------------------------------------------------------

    def used(self, policy: CotPolicy) -> _Used:
        ck = (policy.periodic, policy.interval, policy.early_interval, policy.dense_from,
              policy.max_probes)
        if ck in self._used:
            return self._used[ck]
        t = self.t
        pos = t.pos
        due = (pos > 0) & policy.periodic
        if policy.early_interval is not None:
            early = pos < policy.dense_from
            due &= np.where(early, pos % policy.early_interval == 0, pos % policy.interval == 0)
        else:
            due &= pos % policy.interval == 0
        rows = np.flatnonzero(due)
        run = t.run_of[rows]
        first = np.searchsorted(run, np.arange(t.n_runs))
        if policy.max_probes is not None:
            keep = np.arange(len(rows)) - first[run] < policy.max_probes
            rows, run = rows[keep], run[keep]
            first = np.searchsorted(run, np.arange(t.n_runs))
        last = np.searchsorted(run, np.arange(t.n_runs), "right") - 1
        used = _Used(rows, run, pos[rows], t.key[rows], t.hesitant[rows], first, last,
                     np.cumsum(t.cost[rows]), np.cumsum(t.decoded[rows]))
        self._used[ck] = used
        return used

    # --- the agreement window -------------------------------------------------------------

    def window(self, policy: CotPolicy) -> tuple[np.ndarray, np.ndarray]:
        """Per used probe: whether the window rule holds there, and the agreed answer id."""
        u = self.used(policy)
        votes = math.ceil(policy.agree_share * policy.window)  # decide_cot's votes >= share*W
        ck = (policy.interval, policy.early_interval, policy.dense_from, policy.max_probes,
              policy.hesitation, policy.window, votes)
        if ck in self._windows:
            return self._windows[ck]
        w = policy.window
        if policy.hesitation == "exclude":
            s_idx = np.flatnonzero(~u.hesitant)  # the window slides over certain probes only
        else:
            s_idx = np.arange(len(u.rows))
        s_run, s_key = u.run[s_idx], u.key[s_idx]
        n_runs = self.t.n_runs
        first = np.searchsorted(s_run, np.arange(n_runs))
        last = np.searchsorted(s_run, np.arange(n_runs), "right") - 1
        j = np.arange(len(s_idx))
        ok = j - first[s_run] >= w - 1
        if policy.hesitation == "veto":
            hc = np.concatenate([[0], np.cumsum(u.hesitant[s_idx])])
            ok &= hc[j + 1] - hc[np.maximum(j - w + 1, 0)] == 0
        # A window ending at j holds `votes` equal answers iff for some answer's i-th and
        # (i + votes - 1)-th occurrences a, b: b <= j <= a + w - 1. With a strict majority
        # these intervals never overlap across answers, so each covered j has one answer.
        valid = np.flatnonzero(s_key >= 0)
        order = valid[np.argsort(s_key[valid], kind="stable")]
        covered = np.zeros(len(s_idx), bool)
        mark = np.full(len(s_idx), -1, np.int64)
        if len(order) >= votes:
            a, b = order[: len(order) - votes + 1], order[votes - 1 :]
            ka = s_key[a]
            sel = (ka == s_key[b]) & (b - a <= w - 1)
            starts = b[sel]
            ends = np.minimum(a[sel] + w - 1, last[s_run[a[sel]]])
            n = len(s_idx) + 1
            depth = np.cumsum(np.bincount(starts, minlength=n) - np.bincount(ends + 1, minlength=n))
            covered = depth[:-1] > 0
            mark[starts] = ka[sel]
        latest = np.maximum.accumulate(np.where(mark >= 0, j, -1)) if len(j) else j
        sat_s = ok & covered
        key_s = np.where(sat_s, mark[np.maximum(latest, 0)], -1)
        if policy.hesitation == "exclude":
            # A hesitant probe decides on the window of the certain probes before it.
            count = np.cumsum(~u.hesitant) - 1
            has = count >= first[u.run]
            at = np.where(has, count, 0)
            sat = has & sat_s[at] if len(s_idx) else np.zeros(len(u.rows), bool)
            key = np.where(sat, key_s[at], -1) if len(s_idx) else np.full(len(u.rows), -1)
        else:
            sat, key = sat_s, key_s
        self._windows[ck] = (sat, key)
        return sat, key

    # --- the learned rule -----------------------------------------------------------------

    def features(self, policy: CotPolicy) -> dict[str, np.ndarray]:
        """`policy.cot_features` at every used probe, computed for all at once."""
        ck = (policy.interval, policy.early_interval, policy.dense_from, policy.max_probes)
        if ck in self._features:
            return self._features[ck]
        u, t = self.used(policy), self.t
        n = len(u.rows)
        idx = np.arange(n)
        new_seg = np.ones(n, bool)
        new_seg[1:] = (u.run[1:] != u.run[:-1]) | (u.key[1:] != u.key[:-1])
        seg_first = np.maximum.accumulate(np.where(new_seg, idx, 0)) if n else idx
        run_tokens = np.where(u.key >= 0, u.pos - u.pos[seg_first], 0)
        has_key = np.flatnonzero(u.key >= 0)
        _, rank = _group_rank(u.key[has_key])
        same = np.zeros(n, np.int64)
        same[has_key] = rank + 1
        first_seen = np.zeros(n, np.int64)
        first_seen[has_key[rank == 0]] = 1
        seen_so_far = np.cumsum(first_seen)
        base = np.concatenate([[0], seen_so_far])[u.first[u.run]] if n else seen_so_far
        distinct = seen_so_far - base
        k = idx - u.first[u.run] + 1
        h, v = t.hesitations[u.rows], t.verifications[u.rows]
        feats = {
            "run_tokens": run_tokens / (run_tokens + 1024.0),
            "answer_share": same / k.astype(np.float64),
            "distinct_answers": distinct / (distinct + 4.0),
            "position": u.pos / (u.pos + 4096.0),
            "think_closed": t.think[u.rows],
            "answer_seen": t.seen[u.rows],
            "hesitations": h / (h + 2.0),
            "verifications": v / (v + 2.0),
        }
        self._features[ck] = feats
        return feats

    def score(self, policy: CotPolicy, rule: StopRule) -> np.ndarray:
        ck = (policy.interval, policy.early_interval, policy.dense_from, policy.max_probes,
              rule.features, rule.weights, rule.bias)
        if ck not in self._scores:
            feats = self.features(policy)
            z = np.full(len(self.used(policy).rows), rule.bias)
            for name, weight in zip(rule.features, rule.weights):
                z = z + weight * feats[name]  # the order `StopRule.score` sums in
            self._scores[ck] = z
        return self._scores[ck]

    # --- where each run stops -------------------------------------------------------------

    def periodic_hits(self, policy: CotPolicy) -> Hits:
        """The periodic agreement rule's first stop per run (vectorised)."""
        u = self.used(policy)
        if len(u.rows) == 0:  # nothing on the schedule was recorded: nothing can stop
            return triggers.no_hits(self.t.n_runs, triggers.PROBE)
        sat, key = self.window(policy)
        cond = sat & (u.pos >= policy.min_tokens)
        if policy.rule is not None:
            cond &= self.score(policy, policy.rule) >= policy.rule.logit_threshold
        return triggers.first_per_run(self.t.n_runs, u.run, u.pos, key, u.rows, cond, 1,
                                      triggers.PROBE)

    def stops(self, policy: CotPolicy) -> Stops:
        votes = math.ceil(policy.agree_share * policy.window)
        if policy.periodic and (2 * votes <= policy.window or policy.min_confidence is not None):
            return self._stops_exact(policy)
        t = self.t
        said, said_rows = triggers.statement_probes(t, policy)
        trial_rows = triggers.trials_taken(t, policy)
        # At one probe the statement rule decides first, as `decide_cot` does.
        hits = [said, self.periodic_hits(policy), triggers.trial_hits(t, policy, trial_rows),
                triggers.think_hits(t, policy)]
        stop = triggers.earliest(t.n_runs, hits)
        taken_rows = np.zeros(len(t.pos), bool)  # each probe taken costs once
        taken_rows[self.used(policy).rows] = True
        taken_rows[said_rows] = True
        rows = np.flatnonzero(taken_rows)
        m = triggers.span(t)
        n_p, cost_p = triggers.cost_upto(t.run_of[rows], t.pos[rows], t.cost[rows], t.n_runs,
                                         stop, 1, m)
        _, dec_p = triggers.cost_upto(t.run_of[rows], t.pos[rows], t.decoded[rows], t.n_runs,
                                      stop, 1, m)
        n_t, cost_t, dec_t = triggers.trial_costs(t, trial_rows, stop)
        return self._finish(stop, n_p + n_t, cost_p + cost_t, dec_p + dec_t)

    def _finish(self, stop: Combined, probes: np.ndarray, cost: np.ndarray,
                decoded: np.ndarray) -> Stops:
        stopped = stop.pos != NEVER
        return Stops(row=np.where(stopped, stop.row, -1), key=np.where(stopped, stop.key, -1),
                     probes=probes.astype(np.int64), cost=cost.astype(np.int64),
                     decoded=decoded.astype(np.int64), pos=np.where(stopped, stop.pos, -1),
                     source=np.where(stopped, stop.source, triggers.NONE))

    def _stops_exact(self, policy: CotPolicy) -> Stops:
        """Every run through the decision function itself (rules the vectors cannot hold)."""
        t = self.t
        n = t.n_runs
        pos, key, row = (np.full(n, -1, np.int64) for _ in range(3))
        source = np.zeros(n, np.int64)
        probes, cost, decoded = (np.zeros(n, np.int64) for _ in range(3))
        codes = {v: k for k, v in SOURCES.items()}
        for r in range(n):
            seq = t.observations(r)
            index, decision = first_stop(policy, seq)
            took = taken(policy, seq if index is None else seq[: index + 1])
            probes[r] = len(took)
            decoded[r] = sum(p.tokens for p in took)
            cost[r] = decoded[r] + PROBE_PROMPT_COST * len(took)
            if index is None:
                continue
            at = seq[index]
            pos[r], source[r] = at.position, codes[decision.source or "probe"]
            key[r] = self.key_of(r, decision.answer)
            if isinstance(at, ProbeObservation) and not at.trial:
                lo, hi = int(t.run_start[r]), int(t.run_start[r + 1])
                row[r] = lo + int(np.searchsorted(t.pos[lo:hi], at.position))
        stop = Combined(np.where(pos >= 0, pos, NEVER), np.zeros(n, np.int64), key, row, source)
        return self._finish(stop, probes, cost, decoded)

    def key_of(self, run: int, answer: str | None) -> int:
        """The answer id of `answer` in `run` (-1: no answer)."""
        k = normalize_answer(answer)
        if k is None:
            return -1
        ids = self.t.key_run  # answer ids are numbered run after run
        for i in range(int(np.searchsorted(ids, run)), int(np.searchsorted(ids, run, "right"))):
            if normalize_answer(self.t.key_answer[i]) == k:
                return i
        return -1
