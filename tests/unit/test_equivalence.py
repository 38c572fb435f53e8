"""Math-aware answer equivalence: fast path, math-verify, caching, async timeouts."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.pipeline.equivalence import AsyncEquivalence, Equivalence, group_answers


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [("\\frac{1}{2}", "0.5", True), ("36", "36.0", True), ("\\dfrac{3}{4}", "3/4", True),
     ("2", "3", False), ("x", None, False), ("\\sqrt{4}", "2", True)],
)
def test_same(a, b, same):
    assert Equivalence().same(a, b) is same


def test_slow_path_is_cached_and_symmetric():
    calls = []

    def slow(a, b):
        calls.append((a, b))
        return True

    eq = Equivalence(slow)
    assert eq.same("a1", "b1") and eq.same("b1", "a1")
    assert calls == [("a1", "b1")]
    assert eq.same("7", "7.") and len(calls) == 1  # fast path, no slow call


def test_group_answers_joins_equivalent_answers():
    eq = Equivalence()
    assert group_answers(["\\frac{1}{2}", "0.5", None, "1", None], eq.same) == [0, 0, 1, 2, 3]


async def test_async_grouping_matches_sync():
    eq = AsyncEquivalence()
    try:
        assert await eq.group(["\\frac{1}{2}", "0.5", None, "1"]) == [0, 0, 1, 2]
        assert await eq.same("2", "2")
    finally:
        eq.close()


def _slow_check(a, b):
    time.sleep(60)
    return True


async def test_async_equivalence_times_out_to_different(monkeypatch):
    import proxy.pipeline.equivalence as mod

    monkeypatch.setattr(mod, "_math_verify", _slow_check)
    eq = AsyncEquivalence(timeout_s=0.5)
    try:
        eq.warm()
        await eq._ready()  # the worker's start is waited for apart from the check's time limit
        started = time.perf_counter()
        assert await eq.same("x+1", "1+x") is False
        assert time.perf_counter() - started < 30  # the time limit, not the minute the check takes
        assert eq.timeouts == 1
    finally:
        eq.close()


async def test_checks_that_time_out_together_replace_the_worker_once(monkeypatch):
    import proxy.pipeline.equivalence as mod

    monkeypatch.setattr(mod, "_math_verify", _slow_check)
    eq = AsyncEquivalence(timeout_s=0.5)
    try:
        assert await asyncio.gather(eq.same("x+1", "1+x"), eq.same("2x", "x*2")) == [False, False]
        assert eq.timeouts == 2
    finally:
        eq.close()


def test_the_worker_does_not_run_an_unguarded_main_script_again(tmp_path):
    """A spawned worker re-imports its parent's main script: one embedding the proxy without an
    `if __name__ == "__main__"` guard started itself again (a second SGLang server, once)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "embed.py"
    script.write_text(
        "import asyncio\n"
        "from proxy.pipeline.equivalence import AsyncEquivalence\n"
        "print('main ran', flush=True)\n"
        "async def check():\n"
        "    eq = AsyncEquivalence(timeout_s=60)\n"
        "    try:\n"
        "        print(await eq.same('\\\\frac{1}{2}', '0.5'), flush=True)\n"
        "    finally:\n"
        "        eq.close()\n"
        "asyncio.run(check())\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=root, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["main", "ran", "True"]


def test_the_worker_does_not_outlive_a_killed_proxy(tmp_path):
    """A proxy killed (or gone while its worker was still starting) leaves no worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import time\n"
              "from proxy.pipeline.equivalence import AsyncEquivalence\n"
              "eq = AsyncEquivalence()\neq.warm()\n"
              "print(*eq._pool._processes, flush=True)\n"
              "time.sleep(600)\n")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          text=True) as proxy:
        worker = int(proxy.stdout.readline())
        proxy.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the equivalence worker outlived its proxy")
