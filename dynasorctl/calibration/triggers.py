"""Vectorised replay of the statement, transition and end-of-thinking triggers.

Each trigger's stop condition depends only on its own observations (and on the
statements before them), so each gives, per run, its first hit; the policy stops at
the earliest hit in causal order (`observations.causal_rank`: a probe, then a trial,
then the end of thinking). What the stop costs is every probe and trial taken up to
it. The tests hold all of it to `proxy.policy.first_stop`, observation for observation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynasorctl.calibration.table import PROBE_PROMPT_COST, ProbeTable
from proxy.core.policy import CotPolicy

NEVER = np.iinfo(np.int64).max
# Sources of a stop, as stored in `Stops.source`.
NONE, PROBE, TRIAL, TEXT = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Hits:
    """Per run, the first observation at which one trigger stops (`pos` NEVER: none)."""

    pos: np.ndarray  # int64
    rank: np.ndarray  # int64: causal rank at that position (1 probe, 2 trial, 3 text)
    key: np.ndarray  # int64 answer id
    row: np.ndarray  # int64 probe row (probe sources), else -1
    source: int


def no_hits(n_runs: int, source: int) -> Hits:
    return Hits(np.full(n_runs, NEVER, np.int64), np.zeros(n_runs, np.int64),
                np.full(n_runs, -1, np.int64), np.full(n_runs, -1, np.int64), source)


def first_per_run(n_runs: int, run: np.ndarray, pos: np.ndarray, key: np.ndarray,
                  row: np.ndarray, hold: np.ndarray, rank: int, source: int) -> Hits:
    """The first row per run (rows in causal order within a run) where `hold` is true."""
    out = no_hits(n_runs, source)
    hits = np.flatnonzero(hold)
    runs, first = np.unique(run[hits], return_index=True)
    at = hits[first]
    out.pos[runs], out.key[runs], out.row[runs] = pos[at], key[at], row[at]
    out.rank[runs] = rank
    return out


def _code(run: np.ndarray, pos: np.ndarray, span: int) -> np.ndarray:
    """One sortable number per (run, position): rows sorted by run then position stay sorted."""
    return run * span + pos


def span(t: ProbeTable, extra: int = 0) -> int:
    return int(t.main_tokens.max(initial=0)) + extra + 2


def statement_probes(t: ProbeTable, policy: CotPolicy) -> tuple[Hits, np.ndarray]:
    """The statement trigger's first hits, and the probe rows it takes (sorted, unique)."""
    rule = policy.statement
    if rule is None:
        return no_hits(t.n_runs, PROBE), np.zeros(0, np.int64)
    s, a = t.sig, rule.align
    m = span(t, a)
    trig = s.st_new if rule.new_answers_only else np.ones(len(s.st_pos), bool)
    q = -(-s.st_pos[trig] // a) * a
    qrun = s.st_run[trig]
    keep = q > 0
    due = np.unique(_code(qrun[keep], q[keep], m))  # one probe per (run, position)
    run, q = due // m, due % m
    code = _code(t.run_of, t.pos, m)
    idx = np.searchsorted(code, due)
    exists = idx < len(code)
    exists[exists] = code[idx[exists]] == due[exists]
    run, q, idx = run[exists], q[exists], idx[exists]
    latest = np.searchsorted(_code(s.st_run, s.st_pos, m), due[exists], "right") - 1
    key = t.key[idx]
    hold = (key >= 0) & (key == s.st_key[latest]) & (q >= policy.min_tokens)
    if rule.min_confidence is not None:
        hold &= t.conf[idx] >= rule.min_confidence  # NaN (not measured) never passes
    return first_per_run(t.n_runs, run, q, key, idx, hold, 1, PROBE), idx


def trials_taken(t: ProbeTable, policy: CotPolicy) -> np.ndarray:
    """Rows of the trials the policy takes: its first `max_trials` in each run."""
    if policy.transition is None:
        return np.zeros(0, np.int64)
    s = t.sig
    index = np.arange(len(s.tr_pos)) - s.tr_start[s.tr_run]
    return np.flatnonzero(index < policy.transition.max_trials)


def trial_hits(t: ProbeTable, policy: CotPolicy, rows: np.ndarray) -> Hits:
    """The transition trigger's first hits among the trials taken (`rows`)."""
    rule = policy.transition
    if rule is None or len(rows) == 0:
        return no_hits(t.n_runs, TRIAL)
    s = t.sig
    run, pos, key, conf = s.tr_run[rows], s.tr_pos[rows], s.tr_key[rows], s.tr_conf[rows]
    hold = np.zeros(len(rows), bool)
    if rule.min_confidence is not None:
        hold |= (key >= 0) & (conf >= rule.min_confidence)
    if rule.agree is not None:
        ok = (key >= 0) & (conf >= rule.agree_confidence)
        chained = np.zeros(len(rows), bool)
        chained[1:] = ok[1:] & ok[:-1] & (run[1:] == run[:-1]) & (key[1:] == key[:-1])
        # Streak of ok trials with one answer ending at each row: index minus its start.
        idx = np.arange(len(rows))
        start = np.maximum.accumulate(np.where(~chained, idx, 0))
        hold |= ok & (idx - start + 1 >= rule.agree)
    hold &= pos >= policy.min_tokens
    return first_per_run(t.n_runs, run, pos, key, np.full(len(rows), -1, np.int64), hold, 2,
                         TRIAL)


def think_hits(t: ProbeTable, policy: CotPolicy) -> Hits:
    out = no_hits(t.n_runs, TEXT)
    if not policy.think_end:
        return out
    s = t.sig
    hold = (s.te_pos >= 0) & (s.te_key >= 0) & (s.te_pos >= policy.min_tokens)
    out.pos[hold], out.key[hold] = s.te_pos[hold], s.te_key[hold]
    out.rank[hold] = 3
    return out


@dataclass(frozen=True, slots=True)
class Combined:
    """The earliest hit per run over every trigger."""

    pos: np.ndarray
    rank: np.ndarray
    key: np.ndarray
    row: np.ndarray
    source: np.ndarray


def earliest(n_runs: int, hits: list[Hits]) -> Combined:
    """Per run, the first hit in causal order; among equals, the first trigger listed."""
    pos = np.full(n_runs, NEVER, np.int64)
    rank = np.full(n_runs, 4, np.int64)
    key = np.full(n_runs, -1, np.int64)
    row = np.full(n_runs, -1, np.int64)
    source = np.zeros(n_runs, np.int64)
    for h in hits:
        better = (h.pos < pos) | ((h.pos == pos) & (h.rank < rank))
        better &= h.pos != NEVER
        pos[better], rank[better], key[better] = h.pos[better], h.rank[better], h.key[better]
        row[better], source[better] = h.row[better], h.source
    return Combined(pos, rank, key, row, source)


def cost_upto(run: np.ndarray, pos: np.ndarray, cost: np.ndarray, n_runs: int, stop: Combined,
              rank: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, summed cost) per run of the rows (run, pos sorted) taken up to each run's stop.

    A row of causal rank `rank` at the stop's own position is taken when the stop's rank
    is not below it (a trial at the position of a probe that stops is not taken).
    """
    code = _code(run, pos, m)
    first = np.searchsorted(run, np.arange(n_runs))
    limit = np.where(stop.pos == NEVER, m - 1, stop.pos)
    side_incl = stop.rank >= rank
    target = _code(np.arange(n_runs), limit, m)
    upto = np.where(side_incl, np.searchsorted(code, target, "right"),
                    np.searchsorted(code, target, "left"))
    cum = np.concatenate([[0], np.cumsum(cost)])
    return upto - first, cum[upto] - cum[first]


def trial_costs(t: ProbeTable, rows: np.ndarray, stop: Combined
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trials, cost, decoded tokens) per run of the trials taken up to the stop."""
    s = t.sig
    m = span(t)
    decoded = s.tr_decoded[rows]
    count, cost = cost_upto(s.tr_run[rows], s.tr_pos[rows], decoded + PROBE_PROMPT_COST,
                            t.n_runs, stop, 2, m)
    _, dec = cost_upto(s.tr_run[rows], s.tr_pos[rows], decoded, t.n_runs, stop, 2, m)
    return count, cost, dec
