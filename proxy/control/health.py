"""Kubernetes-style probes: `/health/live` (the process answers) and `/health/ready`.

Ready means the proxy can do its job now: its start-up ran (the store is open and
migrated), the store takes a write, and the upstream answers. Each ready check is
done afresh, off the event loop where it touches the store, within `timeout_s`,
so a probe never hangs on a stuck dependency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.upstream.base import Upstream, UpstreamError

# The upstream path asked: every OpenAI-compatible server (vLLM, SGLang, routers) has it.
UPSTREAM_PATH = "/v1/models"


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str


class Readiness:
    """The ready checks. `store_check` (a write the store can refuse, blocking) is set once
    the store is open; without one (a store handed in, as in tests) the recorder's last
    write is the evidence."""

    def __init__(self, upstream: Upstream, timeout_s: float = 2.0) -> None:
        self._upstream = upstream
        self._timeout_s = timeout_s
        self.store_check: Callable[[], None] | None = None

    async def check(self, started: bool, store_healthy: bool) -> tuple[bool, dict[str, Any]]:
        """(ready, the checks by name with what each found)."""
        if not started:
            migrated = Check(False, "starting: the store is not open and migrated yet")
            checks = {"migrations": migrated, "store": Check(False, "not checked"),
                      "upstream": Check(False, "not checked")}
        else:
            store, upstream = await asyncio.gather(self._store(store_healthy), self._upstream_answers())
            checks = {"migrations": Check(True, "ran"), "store": store, "upstream": upstream}
        ready = all(c.ok for c in checks.values())
        return ready, {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()}

    async def _store(self, healthy: bool) -> Check:
        if not healthy:
            return Check(False, "the last write failed (see /health)")
        if self.store_check is None:
            return Check(True, "writable")
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store_check), self._timeout_s)
        except TimeoutError:
            return Check(False, f"no write within {self._timeout_s:g} s (locked?)")
        except Exception as exc:  # any driver error means: not writable now
            return Check(False, f"not writable: {str(exc).splitlines()[0]}")
        return Check(True, "writable")

    async def _upstream_answers(self) -> Check:
        """Any HTTP answer below 500 counts: a 401 still says the server is up."""
        try:
            async with asyncio.timeout(self._timeout_s):
                resp = await self._upstream.send("GET", UPSTREAM_PATH, [], b"")
                await resp.aclose()
        except TimeoutError:
            return Check(False, f"no answer within {self._timeout_s:g} s")
        except UpstreamError as exc:
            return Check(False, str(exc))
        if resp.status >= 500:
            return Check(False, f"GET {UPSTREAM_PATH} answered {resp.status}")
        return Check(True, f"GET {UPSTREAM_PATH} answered {resp.status}")
