"""Grading answers: math-aware equivalence, memoized, with a cheap numeric fast path.

math-verify costs tens of milliseconds a pair; most pairs met in calibration are two
plain numbers that differ (a wrong probe answer against the gold), which a tiny
exact parser settles at once. Anything it cannot read goes to math-verify.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from proxy.core.certaindex import normalize_answer
from proxy.pipeline.equivalence import Equivalence, fast_same

# Two numbers this far apart (relatively) differ; two within rounding error of each other
# are equal; anything in between is left to math-verify, which has its own rounding rules.
_CLEARLY_APART = 1e-4
# A name with no digits (a variable, a word): never equal to a plain number. Excludes the
# letters math-verify reads as constants (e, i) and anything with a backslash (\\pi, \\infty).
_NAME = re.compile(r"^(?![eEiI]$)[A-Za-z]+(?:_\{?[A-Za-z]\}?)?$")
_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\frac|\\sqrt|\\pi|\\cdot|\\times|[-+*/^(){}]")


class _Unreadable(Exception):
    pass


class _Parser:
    """Recursive descent over + - * / ^, braces, \\frac, \\sqrt, \\pi and implicit products."""

    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        pos = 0
        for match in _TOKEN.finditer(text):
            if match.start() != pos:
                raise _Unreadable(text)
            self.tokens.append(match.group())
            pos = match.end()
        if pos != len(text) or not self.tokens:
            raise _Unreadable(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _Unreadable(expected or "end")
        self.i += 1
        return token

    def value(self) -> float:
        result = self.expr()
        if self.peek() is not None:
            raise _Unreadable(self.peek())
        return result

    def expr(self) -> float:
        result = self.term()
        while self.peek() in ("+", "-"):
            result = result + self.term() if self.take() == "+" else result - self.term()
        return result

    def term(self) -> float:
        result = self.factor()
        while True:
            token = self.peek()
            if token in ("*", "/", "\\cdot", "\\times"):
                self.take()
                right = self.factor()
                result = result / right if token == "/" else result * right
            elif token is not None and (token[0].isdigit() or token in ("(", "{", "\\sqrt", "\\pi")):
                result = result * self.factor()
            elif token == "\\frac":
                if self.tokens[self.i - 1][0].isdigit():
                    raise _Unreadable("mixed number")  # 4\frac{2}{3}: a sum, not a product
                result = result * self.factor()
            else:
                return result

    def factor(self) -> float:
        if self.peek() in ("-", "+"):
            return -self.factor() if self.take() == "-" else self.factor()
        base = self.atom()
        if self.peek() == "^":
            self.take()
            exponent = self.factor()
            if abs(exponent) > 64:
                raise _Unreadable("huge power")
            return base**exponent
        return base

    def atom(self) -> float:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return float(token)
        if token in ("(", "{"):
            inner = self.expr()
            self.take(")" if token == "(" else "}")
            return inner
        if token == "\\frac":
            return self.group() / self.group()
        if token == "\\sqrt":
            return math.sqrt(self.group())
        if token == "\\pi":
            return math.pi
        raise _Unreadable(token)

    def group(self) -> float:
        self.take("{")
        inner = self.expr()
        self.take("}")
        return inner


def plain_number(answer: str | None) -> float | None:
    """The value of an answer that is plain arithmetic on numbers, else None."""
    text = normalize_answer(answer)
    if text is None:
        return None
    try:
        value = _Parser(text).value()
    except (_Unreadable, ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return None
    if isinstance(value, complex) or not math.isfinite(value):
        return None
    return value


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


_WORKER_EQUIVALENCE: Equivalence | None = None
# A check that ran this long probably hit math-verify's own timeout (3 s), whose verdict
# ("different") depends on the machine's load: use it, but do not keep it in the cache.
_SLOW_S = 2.5


def _slow_batch(pairs: list[tuple[str, str]]) -> list[tuple[bool, bool]]:
    """(verdict, worth caching) by math-verify, in this process's main thread."""
    global _WORKER_EQUIVALENCE
    if _WORKER_EQUIVALENCE is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeout warnings
        _WORKER_EQUIVALENCE = Equivalence()
    out = []
    for a, b in pairs:
        started = time.perf_counter()
        verdict = _WORKER_EQUIVALENCE.same(a, b)
        out.append((verdict, time.perf_counter() - started < _SLOW_S))
    return out


class Grader:
    """`same(a, b)` for grading: memo, numeric fast path, then math-verify.

    `same_many` sends the pairs that need math-verify to `workers` processes at once;
    `known` seeds the memo (a persistent cache) and `learned` is what was added since
    (minus verdicts that may come from a timeout).
    """

    def __init__(self, number: Callable[[str | None], float | None] = plain_number,
                 workers: int = 1, known: dict[tuple[str, str], bool] | None = None,
                 slow: Callable[[list[tuple[str, str]]], list[tuple[bool, bool]]] = _slow_batch,
                 ) -> None:
        self._number = number
        self._numbers: dict[str, float | None] = {}
        self._memo: dict[tuple[str, str], bool] = dict(known or {})
        self._slow = slow
        self.workers = workers
        self.learned: dict[tuple[str, str], bool] = {}
        self.slow_checks = 0
        self._pool: Any = None

    def _value(self, answer: str) -> float | None:
        if answer not in self._numbers:
            self._numbers[answer] = self._number(answer)
        return self._numbers[answer]

    def _quick(self, a: str | None, b: str | None) -> bool | None:
        if a is None or b is None:
            return False
        quick = fast_same(a, b)
        if quick is not None:
            return quick
        x, y = self._value(a), self._value(b)
        if x is not None and y is not None:
            scale = max(1.0, abs(x), abs(y))
            if abs(x - y) > _CLEARLY_APART * scale:
                return False
            if abs(x - y) <= 1e-12 * scale:
                return True  # the same number written two ways: 0.5 and \frac{1}{2}
        elif (x is not None and _NAME.match(normalize_answer(b) or "")) or (
            y is not None and _NAME.match(normalize_answer(a) or "")
        ):
            return False
        return self._memo.get(_pair(a, b))

    def same(self, a: str | None, b: str | None) -> bool:
        return self.same_many([(a, b)])[0]

    def same_many(self, pairs: list[tuple[str | None, str | None]]) -> list[bool]:
        """`same` for every pair; the slow ones run together, in parallel when worth it."""
        results = [self._quick(a, b) for a, b in pairs]
        todo = sorted({_pair(a, b) for (a, b), r in zip(pairs, results)  # type: ignore[arg-type]
                       if r is None})
        if todo:
            verdicts = self._run_slow(todo)
            for key, (verdict, keep) in zip(todo, verdicts):
                self._memo[key] = verdict
                if keep:
                    self.learned[key] = verdict
            self.slow_checks += len(todo)
            results = [self._memo[_pair(a, b)] if r is None else r  # type: ignore[arg-type]
                       for (a, b), r in zip(pairs, results)]
        return [bool(r) for r in results]

    def _run_slow(self, todo: list[tuple[str, str]]) -> list[tuple[bool, bool]]:
        if self.workers <= 1 or len(todo) < 64:
            return self._slow(todo)
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=self.workers)
        size = max(8, len(todo) // (self.workers * 4))
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        return [v for chunk in self._pool.map(self._slow, chunks) for v in chunk]

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_cache(path: Path) -> dict[tuple[str, str], bool]:
    """A grading cache written by `save_cache`; empty when missing or unreadable."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return {(a, b): bool(v) for a, b, v in rows}
    except (OSError, ValueError, TypeError):
        return {}


def save_cache(path: Path, known: dict[tuple[str, str], bool]) -> None:
    """Write the cache atomically (a crash leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([[a, b, v] for (a, b), v in sorted(known.items())]),
                   encoding="utf-8")
    tmp.replace(path)
