"""Recorded reasoning traces (see data/traces/README.md): loading and validation.

Two kinds of file, told apart by their records: chain-of-thought traces (one
completion a record, with probes) and self-consistency programs (several
samples of one problem a record).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from proxy.core.policy import ProbeObservation

PACKAGED_SAMPLE = Path(__file__).parent / "data" / "cot-sample.jsonl.gz"
PACKAGED_SC_SAMPLE = Path(__file__).parent / "data" / "sc-sample.jsonl.gz"
PACKAGED_TRIALS = Path(__file__).parent / "data" / "cot-sample-trials.jsonl.gz"


class TraceFileError(Exception):
    """A trace file that is missing, unreadable or malformed; the message says where."""


@dataclass(slots=True)
class CotTrace:
    trace_id: str
    model: str
    dataset: str
    problem_id: str
    seed: int | None
    problem: str
    gold: str
    text: str
    completion_tokens: int
    prompt_tokens: int | None
    finish_reason: str
    final_answer: str | None
    final_correct: bool | None
    probes: list[ProbeObservation]
    probe: dict | None = None  # how the probes were taken: suffix, interval, max_tokens


@dataclass(slots=True)
class ScSample:
    text: str
    completion_tokens: int
    finished: bool
    final_answer: str | None
    final_correct: bool | None
    probes: list[ProbeObservation] = field(default_factory=list)


@dataclass(slots=True)
class ScProgram:
    program_id: str
    model: str
    dataset: str
    problem_id: str
    problem: str
    gold: str
    samples: list[ScSample]


def _probes(raw: list[list]) -> list[ProbeObservation]:
    out = []
    for p in raw:
        position, answer = int(p[0]), p[1]
        certain = bool(p[2]) if len(p) > 2 else True
        tokens = int(p[3]) if len(p) > 3 else 0
        out.append(ProbeObservation(position, answer or None, not certain, tokens))
    return out


def _cot(r: dict) -> CotTrace:
    return CotTrace(
        trace_id=str(r["trace_id"]),
        model=str(r["model"]),
        dataset=str(r["dataset"]),
        problem_id=str(r["problem_id"]),
        seed=r.get("seed"),
        problem=str(r["problem"]),
        gold=str(r["gold"]),
        text=str(r["text"]),
        completion_tokens=int(r["completion_tokens"]),
        prompt_tokens=r.get("prompt_tokens"),
        finish_reason=str(r.get("finish_reason") or "stop"),
        final_answer=r.get("final_answer"),
        final_correct=r.get("final_correct"),
        probes=_probes(r.get("probes") or []),
        probe=r.get("probe") if isinstance(r.get("probe"), dict) else None,
    )


def _sc(r: dict) -> ScProgram:
    samples = [
        ScSample(
            text=str(s["text"]),
            completion_tokens=int(s["completion_tokens"]),
            finished=bool(s.get("finished", True)),
            final_answer=s.get("final_answer"),
            final_correct=s.get("final_correct"),
            probes=_probes(s.get("probes") or []),
        )
        for s in r["samples"]
    ]
    return ScProgram(
        program_id=str(r["program_id"]),
        model=str(r["model"]),
        dataset=str(r["dataset"]),
        problem_id=str(r["problem_id"]),
        problem=str(r["problem"]),
        gold=str(r["gold"]),
        samples=samples,
    )


def open_trace_file(path: Path):
    """A trace (or trial) file opened for text, gzip or plain; TraceFileError if it is not one."""
    if not path.exists():
        raise TraceFileError(f"{path}: no such file")
    if path.is_dir():
        raise TraceFileError(f"{path}: is a directory, not a trace file")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(
        encoding="utf-8"
    )


def load(path: str | Path) -> list[CotTrace] | list[ScProgram]:
    """All records of a trace file: chain-of-thought traces or self-consistency programs."""
    path = Path(path)
    records: list = []
    kind: str | None = None
    try:
        with open_trace_file(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                    this = "sc" if "samples" in raw else "cot"
                    if kind is not None and this != kind:
                        raise ValueError("mixes chain-of-thought and self-consistency records")
                    kind = this
                    records.append(_sc(raw) if this == "sc" else _cot(raw))
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                    raise TraceFileError(f"{path}:{lineno}: not a trace record ({detail})") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TraceFileError(f"{path}: cannot read ({exc})") from exc
    if not records:
        raise TraceFileError(f"{path}: holds no trace records")
    return records


def load_cot(path: str | Path) -> list[CotTrace]:
    records = load(path)
    if not isinstance(records[0], CotTrace):
        raise TraceFileError(f"{path}: holds self-consistency programs, not chain-of-thought traces")
    return records  # type: ignore[return-value]


def load_sc(path: str | Path) -> list[ScProgram]:
    records = load(path)
    if not isinstance(records[0], ScProgram):
        raise TraceFileError(f"{path}: holds chain-of-thought traces, not self-consistency programs")
    return records  # type: ignore[return-value]
