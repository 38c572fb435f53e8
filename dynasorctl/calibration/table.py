"""The probe table: every observed run's probes as flat numpy columns, built once.

Replaying hundreds of policies reads only these columns. Text signals are
computed here for all probes at once, with the same definitions (and, as the tests
check, the same values) as `proxy.policy.text_signals` on the text so far. The
other observations (trials, answer statements, the end of thinking) get columns of
their own (`SignalColumns`), their answers in the same answer-id space as the probes'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynasorctl.calibration.observed import ObservedRun
from dynasorctl.calibration.signals import TextEvents, observations, text_events
from proxy.core.certaindex import normalize_answer
from proxy.core.policy import (
    HESITATION_RE,
    HESITATION_WORDS,
    RECENT_CHARS,
    THINK_END,
    VERIFICATION_RE,
    VERIFICATION_WORDS,
    Observation,
    ProbeObservation,
    TextSignals,
)
from proxy.core.text import text_cut

# Prompt-side cost of one probe (or trial), in token-equivalents, on top of its decoded tokens.
PROBE_PROMPT_COST = 8

__all__ = ["PROBE_PROMPT_COST", "ProbeTable", "SignalColumns", "build_table", "text_cut"]


def _is_word(ch: str, dot: bool = True) -> bool:
    return ch.isalnum() or ch == "_" or (dot and ch == ".")


def first_answer_start(text: str, answer: str) -> tuple[int, int] | None:
    """The first match of `policy.answer_pattern(answer)` in `text`, by `str.find`.

    Returns (start, characters read past the answer): the match holds in a prefix of
    the text iff the prefix reaches start + len(answer) + that many characters.
    """
    start = text.find(answer)
    n = len(text)
    while start != -1:
        after = start + len(answer)
        if start == 0 or not _is_word(text[start - 1]):
            if after < n and not _is_word(text[after]):
                return start, 1
            if after + 1 < n and text[after] == "." and not _is_word(text[after + 1], dot=False):
                return start, 2
        start = text.find(answer, start + 1)
    return None


@dataclass(slots=True)
class SignalColumns:
    """Trials, statements (flat, runs contiguous) and the end of thinking (per run)."""

    tr_start: np.ndarray  # int64, n_runs + 1 offsets into the trial rows
    tr_run: np.ndarray  # int64
    tr_pos: np.ndarray  # int64
    tr_key: np.ndarray  # int64 answer id, -1: no answer
    tr_conf: np.ndarray  # float64
    tr_decoded: np.ndarray  # int64
    has_trials: np.ndarray  # bool per run: trials were recorded for it
    st_start: np.ndarray  # int64, n_runs + 1 offsets into the statement rows
    st_run: np.ndarray  # int64
    st_pos: np.ndarray  # int64
    st_key: np.ndarray  # int64 answer id
    st_new: np.ndarray  # bool: the first statement of its answer in the run
    te_pos: np.ndarray  # int64 per run: token position of `</think>`, -1: none
    te_key: np.ndarray  # int64 per run: the last answer stated before it, -1: none


@dataclass(slots=True)
class ProbeTable:
    """Flat probe columns (one row a probe, runs contiguous) and per-run columns."""

    runs: list[ObservedRun]
    run_start: np.ndarray  # int64, n_runs + 1 offsets into the probe rows
    run_of: np.ndarray  # int64, the run of each probe
    pos: np.ndarray  # int64, main tokens at the probe
    hesitant: np.ndarray  # bool
    cost: np.ndarray  # int64, decoded tokens + PROBE_PROMPT_COST
    decoded: np.ndarray  # int64, decoded tokens
    key: np.ndarray  # int64, answer id (unique across runs; -1: no answer)
    key_answer: list[str]  # a raw answer for each answer id (the first seen)
    key_run: np.ndarray  # int64, the run of each answer id
    think: np.ndarray  # float64 0/1, `</think>` written
    seen: np.ndarray  # float64, share of text since the answer first appeared
    hesitations: np.ndarray  # int64
    verifications: np.ndarray  # int64
    main_tokens: np.ndarray  # int64, per run
    final_key: np.ndarray  # int64, per run: the answer id equal to the final answer, or -1
    conf: np.ndarray  # float64, the probe's confidence (NaN: not measured)
    events: list[TextEvents]  # per run: its statements and end of thinking
    sig: SignalColumns

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    def observations(self, run: int) -> list[Observation]:
        """The run's whole observation sequence, as the decision function reads it."""
        return observations(self.runs[run], self.probes(run), self.events[run])

    def probes(self, run: int) -> tuple[ProbeObservation, ...]:
        """The run's probes carrying the text signals computed here (for `decide_cot`)."""
        lo = int(self.run_start[run])
        if self.runs[run].text is None:
            return self.runs[run].probes
        return tuple(
            ProbeObservation(
                p.position, p.answer, p.hesitant, p.tokens, confidence=p.confidence,
                signals=TextSignals(
                    think_closed=bool(self.think[lo + j]),
                    seen_share=float(self.seen[lo + j]),
                    hesitations=int(self.hesitations[lo + j]),
                    verifications=int(self.verifications[lo + j]),
                ),
            )
            for j, p in enumerate(self.runs[run].probes)
        )


# Characters whose lower case is an ASCII letter or longer than one character: texts
# holding one are scanned with the exact patterns instead of the fast path below.
_CASE_TRAPS = ("\u212a", "\u0130")


def _spans(starts_ends: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    if not starts_ends:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a = np.asarray(sorted(starts_ends), np.int64)
    return a[:, 0], a[:, 1]


def _find_words(low: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """Whole-word occurrences as the policy's patterns define them, found by `str.find`."""
    spans = []
    n = len(low)
    for word in words:
        repeat = word.endswith("+")  # "hmm+": the last letter may repeat
        literal = word.rstrip("+")
        i = low.find(literal)
        while i != -1:
            end = i + len(literal)
            if repeat:
                while end < n and low[end] == literal[-1]:
                    end += 1
            if (i == 0 or not "a" <= low[i - 1] <= "z") and end < n and not "a" <= low[end] <= "z":
                spans.append((i, end))
            i = low.find(literal, i + 1)
    return spans


def signal_word_spans(
    text: str,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(starts, ends) of the hesitation and of the verification words in the whole text."""
    if any(trap in text for trap in _CASE_TRAPS):
        return (_spans([m.span() for m in HESITATION_RE.finditer(text)]),
                _spans([m.span() for m in VERIFICATION_RE.finditer(text)]))
    low = text.lower()
    return _spans(_find_words(low, HESITATION_WORDS)), _spans(_find_words(low, VERIFICATION_WORDS))


def _recent_counts(starts: np.ndarray, ends: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    # A word counts at a cut when it starts in the recent window and the character after
    # it (which the pattern's lookahead reads) is already written.
    lo = np.maximum(cuts - RECENT_CHARS, 0)
    return np.maximum(np.searchsorted(ends, cuts, "left") - np.searchsorted(starts, lo, "left"), 0)


def build_table(runs: Sequence[ObservedRun]) -> ProbeTable:
    """The probe table of these runs (probes oldest first within each run)."""
    runs = list(runs)
    counts = [len(r.probes) for r in runs]
    run_start = np.zeros(len(runs) + 1, np.int64)
    run_start[1:] = np.cumsum(counts)
    n = int(run_start[-1])
    pos = np.zeros(n, np.int64)
    hesitant = np.zeros(n, bool)
    decoded = np.zeros(n, np.int64)
    key = np.full(n, -1, np.int64)
    conf = np.full(n, np.nan, np.float64)
    think = np.zeros(n, np.float64)
    seen = np.zeros(n, np.float64)
    hes = np.zeros(n, np.int64)
    ver = np.zeros(n, np.int64)
    key_answer: list[str] = []
    key_run: list[int] = []
    final_key = np.full(len(runs), -1, np.int64)
    main_tokens = np.asarray([r.main_tokens for r in runs], np.int64)
    normalized: dict[str | None, str | None] = {}
    events: list[TextEvents] = []
    trial_rows: list[tuple[int, int, int, float, int]] = []
    statement_rows: list[tuple[int, int, int, bool]] = []
    te_pos = np.full(len(runs), -1, np.int64)
    te_key = np.full(len(runs), -1, np.int64)
    for ri, run in enumerate(runs):
        lo, hi = int(run_start[ri]), int(run_start[ri + 1])
        ids: dict[str, int] = {}

        def key_of(answer: str | None, ids: dict[str, int] = ids, ri: int = ri) -> int:
            """The answer id of `answer` in this run (registered on first sight); -1: none."""
            if answer not in normalized:
                normalized[answer] = normalize_answer(answer)
            k = normalized[answer]
            if k is None:
                return -1
            if k not in ids:
                ids[k] = len(key_answer)
                key_answer.append(answer)  # type: ignore[arg-type]
                key_run.append(ri)
            return ids[k]

        raw_first: dict[str, tuple[int, int] | None] = {}
        text = run.text
        cuts = None
        if text is not None:
            cuts = np.asarray(
                [text_cut(len(text), p.position, run.main_tokens) for p in run.probes], np.int64
            )
            t_end = text.find(THINK_END)
            if t_end >= 0:
                think[lo:hi] = (t_end + len(THINK_END) <= cuts).astype(np.float64)
            hesitation_spans, verification_spans = signal_word_spans(text)
            hes[lo:hi] = _recent_counts(*hesitation_spans, cuts)
            ver[lo:hi] = _recent_counts(*verification_spans, cuts)
        for j, p in enumerate(run.probes):
            i = lo + j
            pos[i] = p.position
            hesitant[i] = p.hesitant
            decoded[i] = p.tokens
            key[i] = key_of(p.answer)
            if p.confidence is not None:
                conf[i] = p.confidence
            if text is not None and cuts is not None and p.answer:
                if p.answer not in raw_first:
                    raw_first[p.answer] = first_answer_start(text, p.answer)
                first = raw_first[p.answer]
                cut = int(cuts[j])
                if first is not None and first[0] + len(p.answer) + first[1] <= cut:
                    seen[i] = (cut - first[0]) / cut
        trial_rows += [(ri, t.position, key_of(t.answer),
                        np.nan if t.confidence is None else t.confidence, t.tokens)
                       for t in run.trials or ()]
        ev = text_events(run)
        events.append(ev)
        stated: set[int] = set()
        for st in ev.statements:
            k = key_of(st.answer)
            statement_rows.append((ri, st.position, k, k not in stated))
            stated.add(k)
        if ev.think_end is not None:
            te_pos[ri] = ev.think_end.position
            te_key[ri] = key_of(ev.think_end.answer)
        fk = normalize_answer(run.final_answer)
        if fk is not None and fk in ids:
            final_key[ri] = ids[fk]
    return ProbeTable(
        runs=runs, run_start=run_start,
        run_of=np.repeat(np.arange(len(runs), dtype=np.int64), counts),
        pos=pos, hesitant=hesitant, cost=decoded + PROBE_PROMPT_COST, decoded=decoded, key=key,
        key_answer=key_answer, key_run=np.asarray(key_run, np.int64), think=think, seen=seen,
        hesitations=hes, verifications=ver, main_tokens=main_tokens, final_key=final_key,
        conf=conf, events=events,
        sig=_signal_columns(len(runs), trial_rows, statement_rows,
                            np.asarray([r.trials is not None for r in runs], bool), te_pos, te_key),
    )


def _offsets(run_col: np.ndarray, n_runs: int) -> np.ndarray:
    return np.searchsorted(run_col, np.arange(n_runs + 1))


def _signal_columns(n_runs: int, trials: list[tuple[int, int, int, float, int]],
                    statements: list[tuple[int, int, int, bool]], has_trials: np.ndarray,
                    te_pos: np.ndarray, te_key: np.ndarray) -> SignalColumns:
    tr = np.asarray(trials, np.float64).reshape(-1, 5)
    st = np.asarray(statements, np.int64).reshape(-1, 4)
    tr_run = tr[:, 0].astype(np.int64)
    st_run = st[:, 0]
    return SignalColumns(
        tr_start=_offsets(tr_run, n_runs), tr_run=tr_run, tr_pos=tr[:, 1].astype(np.int64),
        tr_key=tr[:, 2].astype(np.int64), tr_conf=tr[:, 3], tr_decoded=tr[:, 4].astype(np.int64),
        has_trials=has_trials, st_start=_offsets(st_run, n_runs), st_run=st_run,
        st_pos=st[:, 1], st_key=st[:, 2], st_new=st[:, 3].astype(bool), te_pos=te_pos,
        te_key=te_key)
