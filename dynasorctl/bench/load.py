"""Load generators: wrk (with a Lua script for the POST body), or a Python one when wrk is absent.

Both keep `concurrency` requests in flight on as many connections for a fixed
time and report completed requests, errors and latency percentiles. The Python
generator is far slower than wrk (it saturates its own core long before a proxy
does), so its capacity figures are labelled as such by the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dynasorctl.bench.processes import BenchError, pinned

MARK = "BENCH-JSON "

# The body is read from a file; done() prints one JSON line the caller parses.
WRK_SCRIPT = r"""
local f = assert(io.open([[@BODY@]], "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '@MARK@{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured; `requests` counts only 2xx answers."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    """wrk's version line (it prints it with its usage, and exits 1)."""
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10,
                         check=False)
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0].strip()


def run_wrk(url: str, body: bytes, concurrency: int, seconds: int, core: int | None,
            workdir: Path) -> LoadResult:
    """One wrk run of POSTs of `body` to `url` (a single thread, pinned to `core`).

    wrk takes whole seconds only.
    """
    key = hashlib.sha1(body).hexdigest()[:12]
    body_path = workdir / f"body-{key}.json"
    body_path.write_bytes(body)
    script = workdir / f"post-{key}.lua"
    script.write_text(WRK_SCRIPT.replace("@BODY@", str(body_path)).replace("@MARK@", MARK))
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
           url]
    try:
        out = subprocess.run(pinned(cmd, core), capture_output=True, text=True,
                             timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 30:g} s") from exc
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise BenchError(f"wrk failed (exit {out.returncode}): {out.stderr or out.stdout}")
    return parse_wrk(line[len(MARK):])


def parse_wrk(line: str) -> LoadResult:
    """A LoadResult from the JSON line the Lua script's done() printed."""
    s = json.loads(line)
    errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
    return LoadResult(requests=s["requests"] - s["status"], errors=errors,
                      seconds=s["duration_us"] / 1e6, p50_ms=s["p50_us"] / 1000,
                      p99_ms=s["p99_us"] / 1000)


def run_python(url: str, body: bytes, concurrency: int, seconds: int) -> LoadResult:
    """The fallback: aiohttp workers in this process (pin this process first)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_python_load(url, body, concurrency, seconds))


async def _python_load(url: str, body: bytes, concurrency: int, seconds: int) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < deadline:
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        ok = 200 <= resp.status < 300
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(len(latencies), errors, elapsed, _percentile(latencies, 50) * 1000,
                      _percentile(latencies, 99) * 1000)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]
