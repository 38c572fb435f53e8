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
from dynasorctl.calibration.store_source import StoreRuns
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


def _observations(probes: list[dict] | None) -> list[ProbeObservation]:
    return [ProbeObservation(p["position"], p["answer"] or None, bool(p["hesitant"]),
                             p["output_tokens"] or 0) for p in probes or ()]


_PROBE_LISTS = """
    SELECT p.request_id, p.choice_index,
           list({'position': p.position, 'answer': p.answer, 'hesitant': p.hesitant,
                 'output_tokens': p.output_tokens} ORDER BY p.position, p.id) AS probes
    FROM probes p SEMI JOIN chosen c ON p.request_id = c.id
    WHERE p.status = 'ok'
    GROUP BY p.request_id, p.choice_index"""


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
        text = "c.completion_text" if with_text == total else "NULL"
        by_request, by_prompt = _labels(con)
        cursor = con.execute(
            f"WITH chosen AS ({chosen}), lists AS ({_PROBE_LISTS}) "
            f"SELECT c.id, c.prompt_hash, c.model, c.final_answer, c.completion_tokens, {text}, "
            "l.probes FROM chosen c LEFT JOIN lists l ON l.request_id = c.id AND "
            "l.choice_index = 0 ORDER BY c.created_at, c.id", params)
        runs = [run_from_request(rid, ph, m, final, tokens, txt, _observations(probes),
                                 gold_for(rid, ph, by_request, by_prompt))
                for rid, ph, m, final, tokens, txt, probes in _batches(cursor)]
    return StoreRuns(runs, with_text, sum(1 for r in runs if r.gold is not None))


def load_programs(directory: Path, model: str | None = None) -> list[ObservedProgram]:
    """The export's self-consistency programs, each sample in drawing order."""
    with _reading(directory) as con:
        where, params = "program_id IS NOT NULL AND status_code = 200", []
        if model is not None:
            where += " AND model = ?"
            params.append(model)
        by_request, by_prompt = _labels(con)
        cursor = con.execute(
            f"WITH chosen AS (SELECT * FROM requests WHERE {where}), lists AS ({_PROBE_LISTS}) "
            "SELECT s.program_id, s.sample_index, s.answer, s.completion_tokens, s.request_id, "
            "c.prompt_hash, c.model, l.probes FROM program_samples s "
            "JOIN chosen c ON s.request_id = c.id LEFT JOIN lists l ON l.request_id = "
            "s.request_id AND l.choice_index = s.choice_index "
            "ORDER BY s.program_id, s.sample_index, s.id", params)
        programs: list[ObservedProgram] = []
        current: list[tuple] = []

        def close() -> None:
            first = current[0]
            programs.append(program_from_samples(
                first[0], first[5], first[6],
                [(s[1], s[2], s[3] or 0, _observations(s[7])) for s in current],
                gold_for(first[4], first[5], by_request, by_prompt)))

        for row in _batches(cursor):
            if current and row[0] != current[0][0]:
                close()
                current = []
            current.append(row)
        if current:
            close()
    return programs
