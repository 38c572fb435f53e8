"""Making a row storable in its table, whatever a client or an upstream sent.

Records carry values that came from outside (a request's `model`, `n`, a program
header, an upstream's usage counts). Each value is made to fit its column the
same way on SQLite and PostgreSQL: integers clamped to 32 bits, non-finite floats
dropped, anything that is not text turned into JSON text, lone surrogates and NUL
characters (PostgreSQL refuses them) replaced, text cut to the column's length.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, Integer, String, Table

# PostgreSQL's INTEGER; SQLite's are wider, but a store must move between the two.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
_UNSTORABLE_CHARS = re.compile("[\ud800-\udfff\x00]")

Fix = Callable[[Any], Any]  # returns the value itself when it is already storable


def _text(length: int | None) -> Fix:
    def fix(value: Any) -> Any:
        if not isinstance(value, str):
            try:
                value = json.dumps(value, ensure_ascii=False, default=repr)
            except (ValueError, RecursionError):  # a cycle, or nesting too deep to walk
                value = repr(type(value))
        if _UNSTORABLE_CHARS.search(value):
            value = _UNSTORABLE_CHARS.sub("\ufffd", value)
        return value[:length] if length is not None and len(value) > length else value

    return fix


def _integer(nullable: bool) -> Fix:
    def fix(value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and math.isfinite(value)):
            value = int(value)
        elif not isinstance(value, int):
            return None if nullable else 0
        return min(max(value, INT_MIN), INT_MAX)  # the value itself when in range

    return fix


def _float(nullable: bool) -> Fix:
    def fix(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None if nullable else 0.0
        if isinstance(value, int):  # past a double's range it cannot be bound
            return value if abs(value) <= 1e300 else float(math.copysign(1e300, value))
        return value if math.isfinite(value) else (None if nullable else 0.0)

    return fix


def _boolean(value: Any) -> Any:
    return value if isinstance(value, bool) else bool(value)


def _datetime(value: Any) -> Any:
    return value if isinstance(value, datetime) else None


def _fixer(column: Any) -> Fix | None:
    kind, nullable = column.type, column.nullable
    if isinstance(kind, Boolean):
        return _boolean
    if isinstance(kind, Integer):
        return _integer(nullable)
    if isinstance(kind, Float):
        return _float(nullable)
    if isinstance(kind, String):  # Text too, with no length
        return _text(kind.length)
    if isinstance(kind, DateTime):
        return _datetime
    return None


class Storable:
    """Fits rows to one table's columns; built once per table."""

    def __init__(self, table: Table) -> None:
        self._fixes = {c.key: f for c in table.columns if (f := _fixer(c)) is not None}

    def fit(self, row: dict[str, Any]) -> list[str]:
        """Make `row` storable in place; returns the names of the fields it changed."""
        changed = []
        for name, value in row.items():
            fix = self._fixes.get(name)
            if fix is None or value is None:
                continue
            new = fix(value)
            if new is not value:  # every fix returns the value itself when it already fits
                row[name] = new
                changed.append(name)
        return changed
