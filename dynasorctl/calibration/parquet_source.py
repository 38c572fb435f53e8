"""A Parquet export (`dynasorctl export`) as calibration's source, read with DuckDB.

The same runs and programs as `store_source` takes from the live store (same filters, same
order, the mapping of `observed.py`), without the store: DuckDB reads only the columns
calibration uses, filters and groups each run's probes into one list out of core (under a
memory limit, spilling to disk), and hands the rows over in batches. Completion text is read
only when every run has it, as text signals need it everywhere or nowhere.

DuckDB rather than Polars: the reading is SQL over hive-partitioned Parquet, joins and
ordered list aggregation with a hard memory limit and spilling to disk, in one dependency
that needs no pandas or pyarrow to hand rows back; Polars' streaming engine does not
guarantee ordered group aggregation out of core.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dynasorctl.calibration.observed import (
    ObservedProgram,
    gold_for,
    program_from_samples,
    run_from_request,
)
from dynasorctl.calibration.store_source import STORE_TRIALS, StoreRuns, Probed, with_trials
from dynasorctl.errors import UserError
from proxy.core.policy import ProbeObservation

MEMORY_LIMIT = "1GB"  # DuckDB spills its joins and aggregations to disk past this
FETCH = 20_000
TABLES = ("requests", "probes", "program_samples")

# Which requests are calibration runs: as store_source._cot_requests.
_COT = ("probed AND status_code = 200 AND finish_reason IS NOT NULL AND program_id IS NULL "
        "AND completion_tokens > 0")


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


@contextmanager
def _reading(directory: Path) -> Iterator[Any]:
    """The export's tables as DuckDB views; an unreadable export is one UserError."""
    import duckdb

    con = connect(directory)
    try:
        yield con
    except duckdb.Error as exc:
        raise UserError(f"cannot read the Parquet export at {directory}: "
                        f"{str(exc).splitlines()[0]}") from exc
    finally:
        con.close()


def connect(directory: Path) -> Any:
    """A DuckDB connection with the export's tables as views; a clear error if it is none."""
    import duckdb

    if not (directory / "requests").is_dir() or not any((directory / "requests").glob("*/*.parquet")):
        raise UserError(f"{directory} holds no Parquet export (make one with `dynasorctl export "
                        f"--out {directory}`)")
    con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "threads": 2})
    for table in TABLES:
        files = _quoted(directory / table / "*" / "*.parquet")
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({files}, "
                    "hive_partitioning = true, union_by_name = true)")
    labels = directory / "labels.parquet"
    con.execute("CREATE VIEW labels AS " + (
        f"SELECT request_id, prompt_hash, gold, created_at, id FROM read_parquet({_quoted(labels)})"
        if labels.exists() else "SELECT NULL::VARCHAR AS request_id, NULL::VARCHAR AS "
        "prompt_hash, NULL::VARCHAR AS gold, NULL::TIMESTAMPTZ AS created_at, 0 AS id LIMIT 0"))
    return con


def _labels(con: Any) -> tuple[dict[str, str], dict[str, str]]:
    by_request: dict[str, str] = {}
    by_prompt: dict[str, str] = {}
    for request_id, prompt_hash, gold in con.execute(
            "SELECT request_id, prompt_hash, gold FROM labels ORDER BY created_at, id").fetchall():
        if request_id is not None:
            by_request[request_id] = gold
        elif prompt_hash is not None:
            by_prompt[prompt_hash] = gold
    return by_request, by_prompt


def _batches(cursor: Any) -> Iterator[tuple]:
    while rows := cursor.fetchmany(FETCH):
        yield from rows


def _probe_rows(con: Any, query: str, params: list) -> Iterator[tuple]:
    """Rows of (key..., position, answer, hesitant, output tokens) from a second cursor."""
    cursor = con.cursor()
    cursor.execute(query, params)
    yield from _batches(cursor)


def _grouped(rows: Iterator[tuple], key_length: int) -> Iterator[tuple[tuple, Probed]]:
    """Consecutive rows with one key (their first `key_length` fields), probes and trials apart."""
    key: tuple | None = None
    found = Probed([], [])
    for row in rows:
        k = row[:key_length]
        if k != key:
            if key is not None:
                yield key, found
            key, found = k, Probed([], [])
        position, answer, hesitant, tokens, confidence, kind = row[key_length:]
        trial = kind == "trial"
        (found.trials if trial else found.probes).append(ProbeObservation(
            position, answer or None, bool(hesitant), tokens or 0, confidence=confidence,
            trial=trial))
    if key is not None:
        yield key, found


class _Merge:
    """Each key's probes, for keys asked in the order the probes stream in (a merge join:
    a run's own columns are read once, not once per probe, and nothing is held but a batch)."""

    def __init__(self, groups: Iterator[tuple[tuple, Probed]]) -> None:
        self._groups = groups
        self._next = next(groups, None)

    def of(self, key: tuple) -> Probed:
        if self._next is not None and self._next[0] == key:
            found = self._next[1]
            self._next = next(self._groups, None)
            return found
        return Probed([], [])


def _probe_columns(con: Any) -> str:
    """The probe columns read; an export made before migration 0007 has no kind or confidence."""
    names = {row[0] for row in con.execute("DESCRIBE probes").fetchall()}
    if {"kind", "confidence"} <= names:
        return "p.position, p.answer, p.hesitant, p.output_tokens, p.confidence, p.kind"
    return "p.position, p.answer, p.hesitant, p.output_tokens, NULL, 'periodic'"


def _took_trials(con: Any, columns: str) -> bool:
    """Whether any trial was recorded (then a run without one had no transition word)."""
    return "p.kind" in columns and con.execute(
        "SELECT count(*) FROM probes WHERE kind = 'trial' AND status = 'ok'").fetchone()[0] > 0


def load_runs(directory: Path, model: str | None = None, newest: int | None = None) -> StoreRuns:
    """The export's probed chain-of-thought runs, oldest first (the newest `newest` only)."""
    with _reading(directory) as con:
        where, params = _COT, []
        if model is not None:
            where += " AND model = ?"
            params.append(model)
        chosen = f"SELECT * FROM requests WHERE {where}"
        if newest is not None:
            chosen += f" ORDER BY created_at DESC, id DESC LIMIT {int(newest)}"
        total, with_text, = con.execute(
            f"WITH chosen AS ({chosen}) SELECT count(*), count(completion_text) FROM chosen",
            params).fetchone()
        text = "completion_text" if with_text == total else "NULL"
        by_request, by_prompt = _labels(con)
        columns = _probe_columns(con)
        took_trials = _took_trials(con, columns)
        probes = _Merge(_grouped(_probe_rows(con, (
            f"WITH chosen AS ({chosen}) SELECT p.request_id, {columns} FROM probes p "
            "JOIN chosen c ON p.request_id = c.id WHERE p.status = 'ok' AND p.choice_index = 0 "
            "ORDER BY c.created_at, c.id, p.position, p.id"), params), 1))
        cursor = con.cursor()
        cursor.execute(f"WITH chosen AS ({chosen}) SELECT id, prompt_hash, model, final_answer, "
                       f"completion_tokens, {text} FROM chosen ORDER BY created_at, id", params)
        runs = []
        for rid, ph, m, final, tokens, txt in _batches(cursor):
            found = probes.of((rid,))
            run = run_from_request(rid, ph, m, final, tokens, txt, found.probes,
                                   gold_for(rid, ph, by_request, by_prompt))
            runs.append(with_trials(run, found.trials if took_trials else None))
    return StoreRuns(runs, with_text, sum(1 for r in runs if r.gold is not None),
                     STORE_TRIALS if took_trials else None)


def load_programs(directory: Path, model: str | None = None) -> list[ObservedProgram]:
    """The export's self-consistency programs, each sample in drawing order."""
    with _reading(directory) as con:
        where, params = "program_id IS NOT NULL AND status_code = 200", []
        if model is not None:
            where += " AND model = ?"
            params.append(model)
        by_request, by_prompt = _labels(con)
        samples = (f"WITH chosen AS (SELECT * FROM requests WHERE {where}) SELECT s.*, "
                   "c.prompt_hash AS prompt_hash, c.model AS model FROM program_samples s "
                   "JOIN chosen c ON s.request_id = c.id")
        order = "s.program_id, s.sample_index, s.id"
        probes = _Merge(_grouped(_probe_rows(con, (
            f"WITH s AS ({samples}) SELECT p.request_id, p.choice_index, {_probe_columns(con)} FROM probes p "
            "JOIN s ON p.request_id = s.request_id AND p.choice_index = s.choice_index "
            f"WHERE p.status = 'ok' ORDER BY {order}, p.position, p.id"), params), 2))
        cursor = con.cursor()
        cursor.execute(f"WITH s AS ({samples}) SELECT s.program_id, s.sample_index, s.answer, "
                       "s.completion_tokens, s.request_id, s.choice_index, s.prompt_hash, "
                       f"s.model FROM s ORDER BY {order}", params)
        programs: list[ObservedProgram] = []
        current: list[tuple] = []

        def close() -> None:
            first = current[0]
            programs.append(program_from_samples(
                first[0], first[6], first[7],
                [(row[1], row[2], row[3] or 0, probes.of((row[4], row[5])).probes) for row in current],
                gold_for(first[4], first[6], by_request, by_prompt)))

        for row in _batches(cursor):
            if current and row[0] != current[0][0]:
                close()
                current = []
            current.append(row)
        if current:
            close()
    return programs
