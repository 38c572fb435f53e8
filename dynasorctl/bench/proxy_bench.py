"""What the observe-mode proxy costs: side by side with no proxy and with a minimal one.

Setups, each against the same fast fake upstream on loopback:
  direct           the client talks to the fake upstream itself
  floor            a 50-line raw ASGI + aiohttp pass-through (`floor_proxy`)
  relay            the same pass-through on dynasor's own upstream client: the relay alone
  dynasor          `dynasorctl observe --probe-rate 0`: the relay's own cost
  dynasor-probing  `dynasorctl observe --probe-rate 1`, a probe every `PROBE_INTERVAL` tokens

Workloads: non-streamed chat completions one at a time (latency), 64 at a time
(capacity), and streams of 64 token chunks 16 at a time (streaming). The
server under test gets a core of its own; the load generator, this process and
the fake upstream that sits behind a proxy share the other. CPU is read from
/proc/<pid>/stat around each measured run.

`run` does the measuring (processes, load); `figures` and `targets` are plain
functions of its results.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dynasorctl.bench import load
from dynasorctl.bench.fake_upstream import MODEL, STREAM_TOKENS
from dynasorctl.bench.processes import (
    BenchError,
    KeepAwake,
    Server,
    busy_share,
    core_times,
    foreign_share,
    free_port,
    own_cpu_seconds,
    settle,
)


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    probe_rate: float | None = None  # dynasor's; None: not dynasor


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    stream: bool
    concurrency: int
    keep_awake: bool = False  # measure latency, not how fast an idle core wakes


SETUPS = (
    Setup("direct", "direct (no proxy)"),
    Setup("floor", "floor: raw ASGI + aiohttp"),
    Setup("relay", "relay only: raw ASGI + dynasor's client"),
    Setup("dynasor", "dynasor, probing off", 0.0),
    Setup("dynasor-probing", "dynasor, probing on", 1.0),
)
WORKLOADS = (
    Workload("latency", "non-streamed, concurrency 1", False, 1, keep_awake=True),
    Workload("capacity", "non-streamed, concurrency 64", False, 64),
    Workload("streaming", f"{STREAM_TOKENS}-chunk streams, concurrency 16", True, 16),
)
SETUP_KEYS = tuple(s.key for s in SETUPS)

# Targets for dynasor with probing off (reported, never asserted).
TARGET_ADDED_P50_MS = 0.5
TARGET_STREAM_SHARE = 0.80
TARGET_FLOOR_SHARE = 1.0  # at or above the thin pass-through
TARGET_CPU_MS_PER_STREAM = 1.0

# A load core busier than this (wrk plus, behind a proxy, the fake upstream) caps the run.
LOAD_BOUND = 0.95

# Figures the issue reports for other proxies: (name, added p50 ms, share of direct streaming).
REFERENCE = (
    ("LiteLLM", 12.0, 0.01),
    ("Starlette + httpx, 50 lines", 0.9, 0.19),
    ("Starlette + aiohttp, 50 lines", 0.4, 0.92),
)

# dynasor probes every 64 tokens by default, so a 64-chunk stream would fire its one
# probe at its last token, where the stream's end cancels it before it is sent. At 32,
# each stream carries one probe that can finish: the steady state of a long stream.
PROBE_INTERVAL = 32


def request_body(stream: bool) -> bytes:
    """The chat request every workload sends."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 6 * 7? Put the answer in \\boxed{}."}],
        "max_tokens": STREAM_TOKENS,
        "temperature": 0.0,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


# -- results -------------------------------------------------------------------------------


@dataclass
class Cell:
    """One setup under one workload."""

    setup: str
    workload: str
    load: load.LoadResult
    cpu_s: float  # the server under test's CPU during the measured run
    upstream_cpu_s: float | None = None  # the fake upstream's, when behind a proxy
    upstream: dict[str, int] = field(default_factory=dict)  # what the fake upstream answered
    proxy: dict[str, int] = field(default_factory=dict)  # dynasor's counters (probes, records)
    server_core_busy: float | None = None  # shares of the run; None while kept awake
    load_core_busy: float | None = None
    server_core_foreign: float | None = None  # shares that went to processes not ours
    load_core_foreign: float | None = None

    @property
    def load_bound(self) -> bool:
        """The load core was saturated: the setup could have gone faster than measured."""
        return self.load_core_busy is not None and self.load_core_busy >= LOAD_BOUND

    @property
    def cpu_ms_per_request(self) -> float | None:
        return self.cpu_s * 1000 / self.load.requests if self.load.requests else None


@dataclass
class Bench:
    seconds: int
    warmup: int
    load_generator: str
    server_core: int | None
    load_core: int | None
    setups: list[str]
    probe_interval: int = PROBE_INTERVAL
    keep_awake: bool = True
    burst: bool = False
    cells: list[Cell] = field(default_factory=list)

    def cell(self, setup: str, workload: str) -> Cell | None:
        return next((c for c in self.cells if c.setup == setup and c.workload == workload), None)


@dataclass(frozen=True)
class Figures:
    """The reported figures of one setup; None where not measured or not meaningful."""

    p50_ms: float | None
    p99_ms: float | None
    added_p50_ms: float | None
    added_p99_ms: float | None
    capacity_rps: float | None
    capacity_load_bound: bool
    cpu_ms_per_request: float | None
    stream_rps: float | None
    stream_load_bound: bool
    stream_share: float | None  # of direct's streaming throughput
    floor_share: float | None  # of the floor's streaming throughput (same run)
    cpu_ms_per_stream: float | None
    probe_requests: int | None  # seen by the fake upstream during the streaming run
    errors: int


def figures(bench: Bench) -> dict[str, Figures]:
    """Each setup's figures, relative ones against `direct` (when it was measured)."""
    out: dict[str, Figures] = {}
    base_lat, base_stream = bench.cell("direct", "latency"), bench.cell("direct", "streaming")
    floor_stream = bench.cell("floor", "streaming")
    for key in bench.setups:
        lat, cap, stream = (bench.cell(key, w.key) for w in WORKLOADS)
        relative = key != "direct"
        out[key] = Figures(
            p50_ms=lat.load.p50_ms if lat else None,
            p99_ms=lat.load.p99_ms if lat else None,
            added_p50_ms=_minus(lat, base_lat, "p50_ms") if relative else None,
            added_p99_ms=_minus(lat, base_lat, "p99_ms") if relative else None,
            capacity_rps=cap.load.rps if cap else None,
            capacity_load_bound=bool(cap and cap.load_bound),
            cpu_ms_per_request=cap.cpu_ms_per_request if cap else None,
            stream_rps=stream.load.rps if stream else None,
            stream_load_bound=bool(stream and stream.load_bound),
            stream_share=_ratio(stream, base_stream),
            floor_share=_ratio(stream, floor_stream),
            cpu_ms_per_stream=stream.cpu_ms_per_request if stream else None,
            probe_requests=stream.upstream.get("probes") if stream and relative else None,
            errors=sum(c.load.errors for c in (lat, cap, stream) if c),
        )
    return out


def _ratio(cell: Cell | None, base: Cell | None) -> float | None:
    """`cell`'s throughput over `base`'s."""
    if cell is None or base is None or not base.load.rps:
        return None
    return cell.load.rps / base.load.rps


def _minus(cell: Cell | None, base: Cell | None, name: str) -> float | None:
    if cell is None or base is None:
        return None
    return float(getattr(cell.load, name) - getattr(base.load, name))


@dataclass(frozen=True)
class Target:
    key: str  # the Figures field it judges
    name: str
    goal: str
    measured: float | None
    met: bool | None


def targets(figs: dict[str, Figures]) -> list[Target]:
    """The issue's targets for dynasor with probing off, against what was measured."""
    f = figs.get("dynasor")

    def check(value: float | None, ok: Callable[[float], bool]) -> tuple[float | None, bool | None]:
        return value, (None if value is None else ok(value))

    rows = [
        ("added_p50_ms", "added latency, p50, ms", f"<= {TARGET_ADDED_P50_MS}",
         lambda v: v <= TARGET_ADDED_P50_MS),
        ("stream_share", "streaming throughput, share of direct", f">= {TARGET_STREAM_SHARE:.0%}",
         lambda v: v >= TARGET_STREAM_SHARE),
        ("floor_share", "streaming throughput, share of the floor", f">= {TARGET_FLOOR_SHARE:.0%}",
         lambda v: v >= TARGET_FLOOR_SHARE),
        ("cpu_ms_per_stream", f"proxy CPU per {STREAM_TOKENS}-chunk stream, ms",
         f"<= {TARGET_CPU_MS_PER_STREAM}", lambda v: v <= TARGET_CPU_MS_PER_STREAM),
    ]
    return [Target(key, name, goal, *check(getattr(f, key) if f else None, ok))
            for key, name, goal, ok in rows]


# -- measuring -----------------------------------------------------------------------------


def cores() -> tuple[int | None, int | None]:
    """(server core, load core): two different cores when this process may use two."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return allowed[1], allowed[0]


def run(seconds: int, warmup: int, generator: Literal["wrk", "python"],
        setups: Iterable[str] = SETUP_KEYS, probe_interval: int = PROBE_INTERVAL,
        keep_awake: bool = True, burst: bool = False,
        say: Callable[[str], None] = lambda _: None) -> Bench:
    """Start the fake upstreams, then each setup in turn, and measure every workload."""
    chosen = [s for s in SETUPS if s.key in set(setups)]
    server_core, load_core = cores()
    label = load.wrk_version() if generator == "wrk" else "python aiohttp (fallback: wrk not found)"
    bench = Bench(seconds, warmup, label, server_core, load_core, [s.key for s in chosen],
                  probe_interval, keep_awake and server_core is not None, burst)
    own_affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="dynasor-bench-") as tmp:
        workdir = Path(tmp)
        if load_core is not None:
            os.sched_setaffinity(0, {load_core})  # the Python load generator, and our polling
        # The fake upstream the client talks to directly is the server under test, so it
        # gets the server's core; the one behind proxies shares the load generator's.
        direct = _fake_upstream("direct-upstream", "fake upstream (direct)", server_core, burst,
                                workdir)
        behind = _fake_upstream("upstream", "fake upstream (behind proxies)", load_core, burst,
                                workdir)
        try:
            direct.start("/health")
            behind.start("/health")
            for setup in chosen:
                if setup.key == "direct":
                    server, upstream = direct, None
                else:
                    server = _proxy(setup, behind.url, server_core, workdir, probe_interval)
                    upstream = behind
                    server.start("/health")
                live = [direct, behind] + ([server] if upstream else [])
                try:
                    for workload in WORKLOADS:
                        say(f"{setup.label}: {workload.label} ...")
                        cell = _measure(bench, setup, workload, server, upstream, live, workdir)
                        bench.cells.append(cell)
                        say(f"  {cell.load.requests} requests in {cell.load.seconds:.1f} s, "
                            f"{cell.load.errors} errors")
                finally:
                    if upstream is not None:
                        server.stop()
        finally:
            for server in (direct, behind):
                server.stop()
            os.sched_setaffinity(0, own_affinity)
    return bench


def _fake_upstream(key: str, name: str, core: int | None, burst: bool, workdir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "dynasorctl.bench.fake_upstream", "--port", str(port)]
    if burst:
        cmd.append("--burst")
    return Server(name, cmd, port, core, workdir / f"{key}.log")


def _proxy(setup: Setup, upstream_url: str, core: int | None, workdir: Path,
           probe_interval: int) -> Server:
    port = free_port()
    if setup.probe_rate is None:
        cmd = [sys.executable, "-m", "dynasorctl.bench.floor_proxy", "--upstream", upstream_url,
               "--port", str(port), "--client", "dynasor" if setup.key == "relay" else "aiohttp"]
    else:
        db = f"sqlite:///{workdir / f'{setup.key}.db'}"
        cmd = [*_dynasorctl(), "observe", "--upstream", upstream_url, "--host", "127.0.0.1",
               "--port", str(port), "--db", db, "--probe-rate", f"{setup.probe_rate:g}"]
    # The operator's DYNASOR_* settings must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNASOR_")}
    if setup.probe_rate:
        env["DYNASOR_PROBE_INTERVAL"] = str(probe_interval)  # observe has no flag for it
    return Server(setup.label, cmd, port, core, workdir / f"{setup.key}.log", env)


def _dynasorctl() -> list[str]:
    """The real `dynasorctl` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "dynasorctl"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "dynasorctl"]


def _measure(bench: Bench, setup: Setup, workload: Workload, server: Server,
             upstream: Server | None, live: list[Server], workdir: Path) -> Cell:
    """One cell: warm up, then CPU, counters and core ticks around one measured run."""
    url = server.url + "/v1/chat/completions"
    body = request_body(workload.stream)
    answering = upstream or server

    def drive(seconds: int) -> load.LoadResult:
        if bench.load_generator.startswith("python"):
            return load.run_python(url, body, workload.concurrency, seconds)
        return load.run_wrk(url, body, workload.concurrency, seconds, bench.load_core, workdir)

    def ours() -> dict[int | None, float]:
        """CPU seconds of everything the benchmark runs, by the core it is pinned to."""
        by_core: dict[int | None, float] = {bench.load_core: own_cpu_seconds()}
        for s in live:
            by_core[s.core] = by_core.get(s.core, 0.0) + s.cpu_seconds()
        return by_core

    awake = bench.keep_awake and workload.keep_awake
    spin = [c for c in (bench.load_core, bench.server_core) if c is not None] if awake else []
    with KeepAwake(spin):
        if bench.warmup > 0:
            drive(bench.warmup)
        settle(server.pid)
        stats0, proxy0 = _stats(answering), _proxy_counters(server, setup)
        cpu0, ours0, cores0 = server.cpu_seconds(), ours(), core_times()
        up0 = upstream.cpu_seconds() if upstream else None
        result = drive(bench.seconds)
        cores1, ours1 = core_times(), ours()
        settle(server.pid)  # the work a request leaves behind (records) is part of its cost
        cpu1 = server.cpu_seconds()
        up1 = upstream.cpu_seconds() if upstream else None
        stats1, proxy1 = _stats(answering), _proxy_counters(server, setup)

    def busy(core: int | None) -> float | None:  # the busy loops would count as busy
        return None if core is None or awake else busy_share(cores0, cores1, core)

    def foreign(core: int | None) -> float | None:
        if core is None or awake:
            return None
        return foreign_share(cores0, cores1, core, ours1.get(core, 0.0) - ours0.get(core, 0.0))

    return Cell(
        setup.key, workload.key, result, cpu1 - cpu0,
        (up1 - up0) if up0 is not None and up1 is not None else None,
        {k: stats1[k] - stats0.get(k, 0) for k in stats1},
        {k: proxy1[k] - proxy0.get(k, 0) for k in proxy1},
        busy(bench.server_core), busy(bench.load_core),
        foreign(bench.server_core), foreign(bench.load_core),
    )


def _stats(fake: Server) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads(fake.get("/stats")).items()}


def _proxy_counters(server: Server, setup: Setup) -> dict[str, int]:
    """dynasor's probe outcomes and record counts, from its /metrics."""
    if setup.probe_rate is None:
        return {}
    return parse_counters(server.get("/metrics").decode())


def parse_counters(text: str) -> dict[str, int]:
    """`probes_<status>`, `records_written` and `records_dropped` from dynasor's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dynasor_probes_total":
                out[f"probes_{sample.labels['status']}"] = int(sample.value)
            elif sample.name in ("dynasor_records_written_total", "dynasor_records_dropped_total"):
                out[sample.name.removeprefix("dynasor_").removesuffix("_total")] = int(sample.value)
    return out


__all__ = ["Bench", "BenchError", "Cell", "Figures", "Target", "figures", "run", "targets"]
