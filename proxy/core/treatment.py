"""Which treatment a request gets (observe, shadow, enforce): pure, no I/O.

Who is enforced is decided by a stable hash of the program (or the request), so
every sample of one program gets the same treatment and the same programs are
enforced every time at a given percentage. The hash is keyed with a secret the
client never sees (HMAC-SHA256), so a client that names its program
(`X-Dynasor-Program`) cannot pick a name that lands in enforce or in shadow.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

Mode = Literal["off", "observe", "shadow", "enforce"]
OPT_HEADER = b"x-dynasor"


def in_rollout(key: str, percent: float, salt: bytes) -> bool:
    """Whether `key` falls in the first `percent` of a hash space keyed by `salt` (sticky per
    key and salt)."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    digest = hmac.new(salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < percent


def choose(mode: Mode, percent: float, key: str, opt: str | None, allow_opt_in: bool,
           salt: bytes) -> Mode:
    """The mode for one request: the opt-out header always wins; enforce covers `percent`."""
    if opt == "off":
        return "off"
    if mode != "enforce":
        return mode
    if opt == "enforce" and allow_opt_in:
        return "enforce"
    return "enforce" if in_rollout(key, percent, salt) else "shadow"
