"""Processes as Linux shows them in /proc: children, liveness, and who carries a marker."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, ... (None: gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def children(of: int) -> set[int]:
    return {pid for pid in pids() if (f := _stat(pid)) is not None and int(f[1]) == of}


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields is not None else None


def alive(pid: int) -> bool:
    """Running or sleeping: not gone, and not a zombie waiting for its parent."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def marked(name: str, value: str) -> list[int]:
    """Live processes whose environment (as started) holds NAME=VALUE."""
    needle = f"{name}={value}".encode()
    found = []
    for pid in pids():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and alive(pid):
            found.append(pid)
    return found


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
