"""Child processes that end with their parent, however the parent ends.

A process the kernel should stop when its parent dies (even by SIGKILL, which leaves the
parent no chance to clean up) asks for it with prctl(PR_SET_PDEATHSIG) on Linux. A
process started by another Python process through `subprocess` cannot safely ask for it
in `preexec_fn` (not safe once the parent has threads), so the parent names itself in
the child's environment (`child_env`) and the child asks at start (`end_with_parent`).
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_ENV = "DYNASOR_END_WITH_PARENT"  # the parent's pid, set by `child_env`


def end_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when `parent` dies; exit now if it has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):  # not Linux: the parent's own shutdown still ends it
        pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a child that should end with this process (see `from_env`)."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def from_env() -> None:
    """At a child's start: end with the parent its environment names, if any.

    SIGTERM, so a proxy flushes its records as on any shutdown."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent and parent.isdigit():
        end_with_parent(int(parent), signal.SIGTERM)
