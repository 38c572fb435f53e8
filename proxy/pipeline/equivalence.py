"""Math-aware answer equivalence (math-verify), cached, with timeouts.

`same(a, b)` is synchronous and cheap on the fast path (normalized strings);
the proxy calls the slow path through `AsyncEquivalence`, which runs it in a
worker process so a pathological expression can neither block the event loop
nor hang forever.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from multiprocessing.connection import wait

from proxy.core.certaindex import normalize_answer
from proxy.lifetime import end_with_parent

log = logging.getLogger(__name__)

# How long a check waits for the worker process to start and import math-verify.
STARTUP_TIMEOUT_S = 60.0

# math-verify's own timeouts use SIGALRM, which only works in the main thread.
_SIGNAL_TIMEOUT_S = 3


def _die_with(parent: int) -> None:
    """The worker's initializer: it ends with the proxy, however the proxy ends.

    A fresh interpreter (spawned, not forked) holds none of the proxy's sockets, store
    files or signal handlers. The kernel kills it when the proxy dies, even by SIGKILL;
    SIGTERM ends it; Ctrl-C, which reaches the whole process group, is the proxy's to act on.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    end_with_parent(parent, signal.SIGKILL)


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with, initargs=(os.getpid(),))


@contextmanager
def _main_not_rerun() -> Iterator[None]:
    """While a worker is spawned: it must not run the proxy's main script again.

    A spawned process re-imports its parent's `__main__` unless that is named `__main__`;
    a script that embeds the proxy without an `if __name__ == "__main__"` guard would
    start itself again in the worker (a test script that started SGLang started a second).
    The worker needs only this module, which it imports by name.
    """
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    main.__spec__ = ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = spec


def _discard(pool: ProcessPoolExecutor, grace_s: float = 0.0, release: bool = False) -> None:
    """Stop `pool` and make sure its worker is gone: an idle one leaves when told, within
    `grace_s`; a stuck one (a check past its time) is killed.

    With `release` (blocking, for shutdown) the pool's queues are released now too: their
    semaphores would otherwise wait for an interpreter exit that a signal may cut short,
    and the spawn context's resource tracker would then warn of them on stderr.
    """
    processes = list((pool._processes or {}).values())  # no public handles in 3.11
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        # Its sentinel, not join(): the pool's own thread reaps it, and a pid reaped is free
        # for another process; one whose sentinel is not ready has not exited.
        if not wait([process.sentinel], grace_s):
            process.kill()
    if release and manager is not None:
        manager.join(timeout=5.0)  # it closes the queues once the worker is gone


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
                _discard(pool)
                self._pool = None
            result = False
        self._cache[key] = result
        return result

    def _worker(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = _pool()
            # The worker's start and imports take seconds on a busy machine; checks wait for
            # them apart from their own time limit, so a slow start is not a wrong verdict.
            with _main_not_rerun():  # the pool starts its worker on this first submit
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
            _discard(self._pool, grace_s=1.0, release=True)
            self._pool = None
