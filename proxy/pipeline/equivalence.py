"""Math-aware answer equivalence (math-verify), cached, with timeouts.

`same(a, b)` is synchronous and cheap on the fast path (normalized strings);
the proxy calls the slow path through `AsyncEquivalence`, which runs it in a
worker process so a pathological expression can neither block the event loop
nor hang forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

from proxy.core.certaindex import normalize_answer

log = logging.getLogger(__name__)

# How long a check waits for the worker process to start and import math-verify.
STARTUP_TIMEOUT_S = 60.0

# math-verify's own timeouts use SIGALRM, which only works in the main thread.
_SIGNAL_TIMEOUT_S = 3


def _exit_with_parent(parent: int) -> None:
    """The worker's initializer: leave once the proxy is gone. A forked worker holds both
    ends of its own task pipe, so a proxy that exits without stopping it (killed, or gone
    while the worker was still importing) would leave it waiting for work forever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start_worker() -> bool:
    """The worker's first job: the imports every check needs (sympy, math-verify)."""
    import math_verify  # noqa: F401

    return True


def _math_verify(a: str, b: str) -> bool:
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()
    timeout = _SIGNAL_TIMEOUT_S if in_main else None
    try:
        gold = parse(f"${a}$", parsing_timeout=timeout)
        pred = parse(f"${b}$", parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on exotic input; unequal is the safe verdict
        return False


def fast_same(a: str | None, b: str | None) -> bool | None:
    """Decide equality from normalized strings alone; None when it cannot tell."""
    if a is None or b is None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    if na is None or nb is None:
        return False
    if na == nb:
        return True
    return None


class Equivalence:
    """A memoized `same(a, b)`; the slow path is math-verify."""

    def __init__(self, slow: Callable[[str, str], bool] = _math_verify) -> None:
        self._slow = slow
        self._cache: dict[tuple[str, str], bool] = {}

    def same(self, a: str | None, b: str | None) -> bool:
        quick = fast_same(a, b)
        if quick is not None:
            return quick
        assert a is not None and b is not None
        key = (a, b) if a <= b else (b, a)
        if key not in self._cache:
            self._cache[key] = self._slow(*key)
        return self._cache[key]

    def __len__(self) -> int:
        return len(self._cache)


def group_answers(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> list[int]:
    """Group index of each answer: equal to a group's first member joins it."""
    reps: list[tuple[int, str]] = []
    groups: list[int] = []
    next_group = 0
    for answer in answers:
        found = None
        if answer is not None:
            for group, rep in reps:
                if same(rep, answer):
                    found = group
                    break
        if found is None:
            found = next_group
            next_group += 1
            if answer is not None:
                reps.append((found, answer))
        groups.append(found)
    return groups


class AsyncEquivalence:
    """Equivalence for the event loop: slow checks in a worker process, bounded in time."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self._timeout_s = timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._cache: dict[tuple[str, str], bool] = {}
        self._started: Future[bool] | None = None
        self.timeouts = 0

    async def same(self, a: str | None, b: str | None) -> bool:
        quick = fast_same(a, b)
        if quick is not None:
            return quick
        assert a is not None and b is not None
        key = (a, b) if a <= b else (b, a)
        if key in self._cache:
            return self._cache[key]
        pool = self._worker()
        await self._ready()
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(loop.run_in_executor(pool, _math_verify, *key), self._timeout_s)
        except (TimeoutError, Exception) as exc:  # a stuck or dead worker: start afresh
            self.timeouts += 1
            log.warning("answer equivalence check failed (%r); treating as different", exc)
            if self._pool is pool:  # checks awaited together share one pool: replace it once
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            result = False
        self._cache[key] = result
        return result

    def _worker(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, initializer=_exit_with_parent,
                                             initargs=(os.getpid(),))
            # The worker's start and imports take seconds on a busy machine; checks wait for
            # them apart from their own time limit, so a slow start is not a wrong verdict.
            self._started = self._pool.submit(_start_worker)
        return self._pool

    def warm(self) -> None:
        """Start the worker now, before the first check needs it."""
        self._worker()

    async def _ready(self) -> None:
        started = self._started
        if started is not None and not started.done():
            try:
                await asyncio.wait_for(asyncio.wrap_future(started), STARTUP_TIMEOUT_S)
            except (TimeoutError, Exception) as exc:  # the check below then fails the usual way
                log.warning("answer equivalence worker slow to start (%r)", exc)

    async def group(self, answers: Sequence[str | None]) -> list[int]:
        """Group index of each answer, as `group_answers` does (slow checks awaited first)."""
        distinct = list(dict.fromkeys(a for a in answers if a is not None))
        verdicts: dict[tuple[str, str], bool] = {}
        for i, a in enumerate(distinct):
            for b in distinct[:i]:
                verdicts[(a, b)] = verdicts[(b, a)] = await self.same(a, b)
        return group_answers(answers, lambda a, b: a == b or verdicts[(a, b)])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
