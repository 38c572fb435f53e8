"""The text a request has generated so far, read as it grows.

The proxy watches a generation token by token; the detectors of `proxy.core.text`
read whole texts. Here they are applied to the growing text incrementally, finding
exactly what they find on the text so far (they are causal), at a small window's
cost a read instead of the whole text's:

- `LiveText`: the text as the probes continue it (for chat, the thinking put back
  in its `<think>` block, as `dialect.assistant_prefix` writes it), with the number of
  characters after each token, so a character offset maps to the token position at
  which it was written (`position`);
- `StatementReader`, `TransitionReader`, `ThinkEndReader`: answer statements,
  transition words and the end of thinking, each found once.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from proxy.core.certaindex import close_brace
from proxy.core.text import THINK_END, Statement, answer_statements, think_end, transition_words

# How far back a statement read looks beyond the text already read: a statement is
# decided within this many characters of its start (an "answer is" phrase and its
# 60-character answer), unless it is an unclosed `\boxed{`, which is followed exactly.
LOOKBACK = 1024
_BOX_OPENERS = ("\\boxed", "\\fbox")


class LiveText:
    """The generated text, one token at a time, and where each token ended."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._ends: list[int] = []  # characters written after each token
        self._joined = ""
        self._joined_parts = 0
        self._thinking = False  # reasoning arrived in a field of its own and is open
        self._reasoned = False

    @property
    def tokens(self) -> int:
        return len(self._ends)

    @property
    def length(self) -> int:
        return self._ends[-1] if self._ends else 0

    def add(self, content: str, reasoning: str = "") -> None:
        """One token: its text, or (chat) its reasoning and content as the server split them."""
        piece = ""
        if reasoning:
            if not self._reasoned:
                piece, self._reasoned, self._thinking = "<think>\n", True, True
            piece += reasoning
        if content:
            if self._thinking:  # the server's reasoning parser ate `</think>`: put it back
                piece += "\n</think>\n\n"
                self._thinking = False
            piece += content
        self._parts.append(piece)
        self._ends.append(self.length + len(piece))

    def text(self) -> str:
        """The whole text so far."""
        if self._joined_parts < len(self._parts):
            self._joined += "".join(self._parts[self._joined_parts:])
            self._joined_parts = len(self._parts)
        return self._joined

    def tail(self, n: int) -> tuple[int, str]:
        """(offset, text): the last `n` characters or more, from a token boundary."""
        i, size = len(self._parts), 0
        while i > 0 and size < n:
            i -= 1
            size += len(self._parts[i])
        start = self._ends[i - 1] if i > 0 else 0
        return start, "".join(self._parts[i:])

    def position(self, offset: int) -> int:
        """The token position at which the text first reached `offset` characters."""
        if offset <= 0:
            return 0
        return min(len(self._ends), bisect.bisect_left(self._ends, offset) + 1)


class StatementReader:
    """Answer statements in the text, each reported once, in the order they are decided."""

    def __init__(self) -> None:
        self._base = 0  # every statement starting before this is already reported
        self._seen: set[tuple[int, int]] = set()

    def read(self, text: str) -> list[Statement]:
        lo = max(0, self._base - 1)  # one character more: the phrase's look-behind
        found = []
        for s in answer_statements(text[lo:]):
            if lo and s.start == 0:
                continue
            start, end = s.start + lo, s.end + lo
            if start >= self._base and (start, end) not in self._seen:
                self._seen.add((start, end))
                found.append(Statement(start, end, s.answer))
        self._base = max(self._base, _open_box(text, lo, max(lo, len(text) - LOOKBACK)))
        self._seen = {k for k in self._seen if k[0] >= self._base}
        return found


def _open_box(text: str, lo: int, limit: int) -> int:
    """The earliest `\\boxed{` in text[lo:limit] not closed yet (or not decided), else `limit`."""
    first = limit
    for opener in _BOX_OPENERS:
        at = text.find(opener, lo, limit + len(opener))  # starting before `limit`
        while 0 <= at < first:
            brace = at + len(opener)
            while brace < len(text) and text[brace].isspace():
                brace += 1
            if brace == len(text) or (text[brace] == "{"
                                      and not close_brace(text[brace + 1:])[1]):
                first = at
                break
            at = text.find(opener, at + 1, limit + len(opener))
    return first


class TransitionReader:
    """Transition words ("Wait"), each reported once with its character offset."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(words)
        self.longest = max((len(w) for w in self.words), default=0)
        self._next = 0  # words starting before this are reported

    def read(self, live: LiveText) -> list[int]:
        if not self.words:
            return []
        start, tail = live.tail(live.length - self._next + 1)
        found = [start + at for at in transition_words(tail, self.words)
                 if (at > 0 or start == 0) and start + at >= self._next]
        if found:
            self._next = found[-1] + 1
        # A word not reported yet cannot start before the last `longest` characters.
        self._next = max(self._next, live.length - self.longest)
        return found

    def bound(self, live: LiveText) -> int:
        """The least token position a word not reported by the reads so far can have."""
        return live.position(self._next)


class ThinkEndReader:
    """The end of thinking: where `</think>` is complete, and the last answer stated before it."""

    def __init__(self) -> None:
        self._checked = 0
        self.at: int | None = None  # offset of `</think>`, once written

    def read(self, live: LiveText) -> tuple[int, str | None] | None:
        """(offset just past `</think>`, last stated answer) the first time it is complete."""
        if self.at is not None:
            return None
        start, tail = live.tail(live.length - self._checked + len(THINK_END))
        at = tail.find(THINK_END)
        self._checked = live.length
        if at < 0:
            return None
        self.at = start + at
        return think_end(live.text())
