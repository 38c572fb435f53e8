"""What the generated text so far says: pure detectors shared by the live proxy and the replay.

Every detector is causal: run on a prefix of the text, it finds exactly what it finds
on the whole text and is complete within that prefix (`end <= len(prefix)`), because
a finding only counts once every character that decides it has been written (the
character after a word, the brace that closes a `\\boxed{`, the full stop after a
stated answer). The proxy runs them on the text it relays; the replay on a recorded
text, mapping character offsets to token positions proportionally
(`token_position`) when no tokenizer is at hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from proxy.core.certaindex import close_brace, normalize_answer

THINK_END = "</think>"

# --- the learned rule's text signals (counts of words near a probe) -------------------------

# Text signals look at this many characters before the probe (about 500 tokens).
RECENT_CHARS = 2000
# Whole words only (ASCII letters), and only once the character after the word has been
# generated, so that the count over a prefix of the text never depends on what follows it.
HESITATION_WORDS = ("wait", "hmm+", "but", "alternatively", "however", "actually", "mistake",
                    "wrong")
VERIFICATION_WORDS = ("check", "checking", "checked", "verify", "verifying", "verified",
                      "verification", "confirm", "confirms", "confirmed", "recheck", "sanity")


def _words(words: Sequence[str]) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z])(?:{'|'.join(words)})(?=[^A-Za-z])",
                      re.IGNORECASE | re.ASCII)


HESITATION_RE = _words(HESITATION_WORDS)
VERIFICATION_RE = _words(VERIFICATION_WORDS)


def answer_pattern(answer: str) -> re.Pattern[str]:
    """The probe answer as written in the text: not inside a longer number or word.

    A full stop may follow ("x = 12.") but not start a decimal ("12.5"); either way
    the characters that decide it must already be written.
    """
    return re.compile(rf"(?<![\w.]){re.escape(answer)}(?=[^\w.]|\.[^\w])")


@dataclass(frozen=True, slots=True)
class TextSignals:
    """What the generated text so far says at a probe (all causal: prefix only)."""

    think_closed: bool = False  # `</think>` already written
    seen_share: float = 0.0  # share of the text written since the probe answer first appeared
    hesitations: int = 0  # hesitation words in the last RECENT_CHARS characters
    verifications: int = 0  # verification words in the last RECENT_CHARS characters


def text_signals(text: str, answer: str | None) -> TextSignals:
    """Signals of the text generated so far, for the probe that answered `answer`."""
    n = len(text)
    seen = 0.0
    if answer and n:
        match = answer_pattern(answer).search(text)
        if match is not None:
            seen = (n - match.start()) / n
    start = max(0, n - RECENT_CHARS)
    return TextSignals(
        think_closed=THINK_END in text,
        seen_share=seen,
        hesitations=sum(1 for _ in HESITATION_RE.finditer(text, start)),
        verifications=sum(1 for _ in VERIFICATION_RE.finditer(text, start)),
    )


# --- answer statements: the model writing its answer inside the thinking ----------------------


@dataclass(frozen=True, slots=True)
class Statement:
    """An answer the text states: `\\boxed{12}`, or "so the answer is 12."."""

    start: int  # character offset where the statement begins
    end: int  # character offset just past the last character that decides it
    answer: str  # the answer as written (a stated one: the part after its last "=")


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is", "final answer should be", "answer would be:" ...; the answer follows.
# (Not preceded by a letter: checked apart, since a lookbehind first makes the search slow.)
_SAID = re.compile(r"answer\s+(?:is|should\s+be|would\s+be|will\s+be)(?![A-Za-z])\s*:?[ \t]*",
                   re.IGNORECASE)
# Where a stated answer ends: a full stop before a space or line break, a comma, a
# semicolon, a line break, or a word such as "but"; a question mark or "!" means doubt.
_STATED_END = re.compile(r"\.(?=\s)|[,;\n?!]|\s(?:but|so|since|because|which|and|or|as|"
                         r"however|therefore|then|wait|if|for)(?![A-Za-z])", re.IGNORECASE)
_MARKUP = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]|\*\*|\\displaystyle")
# A stated answer starts with math, not a word ("the answer is correct", "... is likely 4").
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
STATED_MAX = 60  # longest stated answer read (characters of text after "answer is")


def _stated(text: str, at: int) -> tuple[str, int] | None:
    """The answer stated from offset `at` on, and where it is decided; None if it is not one."""
    window = text[at : at + STATED_MAX + 1]
    if _BOXED.match(window.lstrip("$ ")):
        return None  # "the answer is \boxed{12}": the boxed statement itself
    stop = _STATED_END.search(window)
    if stop is None or stop.start() > STATED_MAX or window[stop.start()] in "?!":
        return None
    raw = _MARKUP.sub("", window[: stop.start()]).strip()
    word = _WORD.search(raw)
    if word is not None:
        raw = raw[: word.start()].strip()  # "180 degrees" -> "180"; "correct" -> ""
    if "=" in raw:
        raw = raw.rsplit("=", 1)[1].strip()  # "x = -4" -> "-4"
    raw = raw.rstrip(".").strip()
    end = at + stop.end() + 1  # the character after the end decides it too (lookaheads)
    if not raw or raw.count("{") != raw.count("}") or end > len(text):
        return None
    return raw, end


def answer_statements(text: str) -> list[Statement]:
    """Every answer statement in `text`, in the order they are decided (complete)."""
    found: list[Statement] = []
    for match in _BOXED.finditer(text):
        content, closed = close_brace(text[match.end():])
        if closed and normalize_answer(content) is not None:
            found.append(Statement(match.start(), match.end() + len(content) + 1,
                                   content.strip()))
    for match in _SAID.finditer(text):
        if match.start() and text[match.start() - 1].isascii() and text[match.start() - 1].isalpha():
            continue
        stated = _stated(text, match.end())
        if stated is not None and normalize_answer(stated[0]) is not None:
            found.append(Statement(match.start(), stated[1], stated[0]))
    found.sort(key=lambda s: (s.end, s.start))
    return found


def thinking(text: str) -> str | None:
    """The text before `</think>`, once `</think>` is written; None before that."""
    at = text.find(THINK_END)
    return None if at < 0 else text[:at]


def think_end(text: str, statements: Sequence[Statement] | None = None,
              ) -> tuple[int, str | None] | None:
    """(offset just past `</think>`, the last answer stated before it), or None if not written.

    The answer is exactly as written in the thinking; no text after `</think>` is read.
    `statements`: `answer_statements(text)`, when already found (by causality, those
    decided before `</think>` are the thinking's own).
    """
    at = text.find(THINK_END)
    if at < 0:
        return None
    if statements is None:
        statements = answer_statements(text[:at])
    inside = [s for s in statements if s.end <= at]
    return at + len(THINK_END), (inside[-1].answer if inside else None)


# --- transition words ("Wait"): where DEER takes its trials -----------------------------------


@lru_cache(maxsize=64)
def _transition_re(words: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    # Whole words (Unicode word characters, as the recorded trials were found), case-
    # insensitive, and only once the character after the word has been written.
    return re.compile(rf"(?<!\w)(?:{alternatives})(?=\W)", re.IGNORECASE)


def transition_words(text: str, words: Sequence[str]) -> list[int]:
    """Character offsets where a transition word starts; a trial continues the text before it."""
    if not words:
        return []
    return [m.start() for m in _transition_re(tuple(words)).finditer(text)]


# --- character offsets and token positions ---------------------------------------------------


def text_cut(n_chars: int, position: int, main_tokens: int) -> int:
    """Characters of the text generated after `position` tokens (proportional estimate)."""
    if main_tokens <= 0:
        return n_chars
    return min(n_chars, n_chars * position // main_tokens)


def token_position(offset: int, n_chars: int, main_tokens: int) -> int:
    """The first token position whose text (by `text_cut`) reaches `offset` characters."""
    if n_chars <= 0:
        return 0
    return min(main_tokens, -(-offset * main_tokens // n_chars))
