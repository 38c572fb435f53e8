"""The benchmark's server processes: started pinned to a core, waited for, measured, stopped.

Only processes started here are ever signalled, each by its own pid.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark process would not start or run; the message says which and why."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cmd: Sequence[str], core: int | None) -> list[str]:
    """`cmd` run on one CPU core (through taskset, so every thread it starts stays there)."""
    if core is None or shutil.which("taskset") is None:
        return list(cmd)
    return ["taskset", "-c", str(core), *cmd]


def spawn(cmd: Sequence[str], core: int | None, **popen: Any) -> subprocess.Popen[bytes]:
    """Start `cmd` pinned to `core` (taskset if there is one, else right after the start)."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(pinned(cmd, core), **popen)
    if core is not None and shutil.which("taskset") is None:
        os.sched_setaffinity(proc.pid, {core})  # before it has started any thread
    return proc


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15


def settle(pid: int, quiet_s: float = 0.5, limit_s: float = 5.0) -> None:
    """Wait until the process has used no CPU for `quiet_s` (its after-work is done)."""
    deadline = time.monotonic() + limit_s
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


@dataclass
class Server:
    """One HTTP server process of the benchmark, listening on 127.0.0.1:`port`."""

    name: str
    cmd: list[str]
    port: int
    core: int | None
    log: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_path: str = "/health", timeout_s: float = 30.0) -> Server:
        """Start the process and wait until `ready_path` answers 200."""
        with self.log.open("wb") as out:
            self.proc = spawn(self.cmd, self.core, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at start:\n"
                                 f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.name} did not answer {ready_path} within {timeout_s:g} s:\n"
                         f"{self.log_tail()}")

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return bytes(resp.read())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGINT (a graceful shutdown: dynasor flushes its store), then SIGKILL if need be."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"


@dataclass(frozen=True)
class CoreTicks:
    """Clock ticks of one CPU core since boot, from /proc/stat."""

    tasks: int  # user, nice, system, irq: time some process is charged for
    softirq: int  # network processing on loopback, charged to no process
    total: int


def core_times() -> dict[int, CoreTicks]:
    out: dict[int, CoreTicks] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
            tasks = user + nice + system + irq
            out[int(name[3:])] = CoreTicks(tasks, softirq, tasks + softirq + idle + iowait + steal)
    return out


def busy_share(before: dict[int, CoreTicks], after: dict[int, CoreTicks], core: int) -> float | None:
    """How busy `core` was between two `core_times` readings, 0 to 1."""
    if core not in before or core not in after:
        return None
    a, b = after[core], before[core]
    total = a.total - b.total
    return (a.tasks + a.softirq - b.tasks - b.softirq) / total if total > 0 else None


def foreign_share(before: dict[int, CoreTicks], after: dict[int, CoreTicks], core: int,
                  ours_s: float) -> float | None:
    """The share of `core` that went to processes other than ours (`ours_s` CPU seconds)."""
    if core not in before or core not in after:
        return None
    total = after[core].total - before[core].total
    if total <= 0:
        return None
    foreign = after[core].tasks - before[core].tasks - ours_s * CLOCK_TICKS
    return max(0.0, foreign / total)


def own_cpu_seconds() -> float:
    """CPU of this process and of its finished children (the load generator's runs)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# A busy loop at SCHED_IDLE: it runs only when the core has nothing else to do.
SPIN = ("import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "while True: pass")


class KeepAwake:
    """Busy loops at idle priority on `cores`, so they never sleep between two requests.

    On a virtual machine an idle core can take milliseconds to wake, which at
    concurrency 1 would measure the hypervisor rather than the proxy. The loops
    yield at once to any real work. Their own CPU shows in /proc/stat, so core
    busy shares taken while they run mean nothing.
    """

    def __init__(self, cores: Sequence[int]) -> None:
        self._cores = list(cores)
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        for core in self._cores:
            self._procs.append(spawn([sys.executable, "-c", SPIN], core,
                                     stdin=subprocess.DEVNULL))
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()
        self._procs.clear()
