"""Which treatment a request gets (observe, shadow, enforce): pure, no I/O.

Who is enforced is decided by a stable hash of the program (or the request), so
every sample of one program gets the same treatment and the same programs are
enforced every time at a given percentage.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Mode = Literal["off", "observe", "shadow", "enforce"]
OPT_HEADER = b"x-dynasor"


def in_rollout(key: str, percent: float) -> bool:
    """Whether `key` falls in the first `percent` of a stable hash space (sticky per key)."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return bucket * 100 < percent


def choose(mode: Mode, percent: float, key: str, opt: str | None, allow_opt_in: bool) -> Mode:
    """The mode for one request: the opt-out header always wins; enforce covers `percent`."""
    if opt == "off":
        return "off"
    if mode != "enforce":
        return mode
    if opt == "enforce" and allow_opt_in:
        return "enforce"
    return "enforce" if in_rollout(key, percent) else "shadow"
