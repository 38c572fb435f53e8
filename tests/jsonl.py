"""Trace files as raw records, for tests that alter them before the commands read them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """Every record of a gzip-compressed JSON Lines file, as plain dicts."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def write_records(path: Path, rows: list[dict]) -> Path:
    """`rows` as a gzip-compressed JSON Lines file at `path`; returns `path`."""
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path
