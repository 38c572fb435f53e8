"""`dynasorctl labels`: import checks every line before writing anything, then adds all labels
in one transaction; calibration reads the newest label, a request's own before its prompt's."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dynasorctl.calibration.store_source import load_runs
from dynasorctl.commands.labels import parse_line
from proxy.store import db
from proxy.store.models import LabelRow
from proxy.store.recorder import Record, write_records
from tests.cli import invoke

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64
START = datetime(2026, 1, 1, tzinfo=UTC)


def _request(rid: str, prompt: str, i: int) -> Record:
    request = {"id": rid, "created_at": START + timedelta(seconds=i), "model": "m",
               "kind": "chat", "upstream": "u", "mode": "observe", "stream": True, "n": 1,
               "status_code": 200, "probed": True, "probe_count": 1, "probe_tokens": 3,
               "completion_tokens": 100, "finish_reason": "stop", "final_answer": "5",
               "prompt_hash": prompt}
    probe = {"request_id": rid, "choice_index": 0, "position": 64, "answer": "5",
             "hesitant": False, "output_tokens": 3, "latency_ms": 1.0, "status": "ok",
             "certaindex": None}
    return Record(request, [probe])


@pytest.fixture()
def store(tmp_path: Path) -> tuple[str, Engine]:
    """r1, r2 share prompt H1; r3 has prompt H2."""
    url = f"sqlite:///{tmp_path}/s.db"
    engine = db.open_store(url)
    write_records(engine, [_request("r1", H1, 0), _request("r2", H1, 1), _request("r3", H2, 2)])
    return url, engine


def labels_file(path: Path, *lines: object) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def n_labels(engine: Engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(LabelRow)) or 0


def gold(engine: Engine) -> dict[str, str | None]:
    return {r.run_id: r.gold for r in load_runs(engine).runs}


def test_import_by_request_and_by_prompt(store: tuple[str, Engine], tmp_path: Path) -> None:
    url, engine = store
    path = labels_file(tmp_path / "gold.jsonl",
                       {"request_id": "r3", "gold": "7", "problem": "ignored"},
                       "",
                       {"prompt_hash": H1.upper(), "gold": 12},  # numbers and upper case hex
                       {"prompt_hash": H3, "gold": "1/2"})  # not seen yet
    code, out, exc = invoke(["labels", "import", str(path), "--db", url])
    assert exc is None and code == 0, out
    assert f"imported 3 labels from {path}: 3 recorded requests labelled" in out
    assert "1 prompt hashes match no recorded request yet" in out
    assert "had a label before" not in out
    assert gold(engine) == {"r1": "12", "r2": "12", "r3": "7"}
    with Session(engine) as s:
        assert {(r.request_id, r.prompt_hash, r.source) for r in s.scalars(select(LabelRow))} == {
            ("r3", None, str(path)), (None, H1, str(path)), (None, H3, str(path))}

    # Newer labels win; a request's own label wins over its prompt's, whatever the order.
    again = labels_file(tmp_path / "fix.jsonl", {"request_id": "r1", "gold": "13"},
                        {"prompt_hash": H2, "gold": "8"})
    code, out, _ = invoke(["labels", "import", str(again), "--db", url])
    assert code == 0 and "2 recorded requests labelled" in out
    assert "1 requests or prompts had a label before" not in out  # r1 had only its prompt's
    assert gold(engine) == {"r1": "13", "r2": "12", "r3": "7"}
    relabel = labels_file(tmp_path / "re.jsonl", {"prompt_hash": H1, "gold": "14"})
    code, out, _ = invoke(["labels", "import", str(relabel), "--db", url])
    assert code == 0 and "1 requests or prompts had a label before" in out
    assert gold(engine) == {"r1": "13", "r2": "14", "r3": "7"}

    code, out, _ = invoke(["labels", "list", "--db", url, "--format", "json"])
    listed = json.loads(out)
    assert listed[0]["prompt_hash"] == H1 and listed[0]["gold"] == "14"
    assert listed[0]["requests"] == 2 and len(listed) == 6
    code, out, _ = invoke(["labels", "list", "--db", url, "--limit", "2"])
    assert code == 0 and "2 most recent labels" in out


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not JSON"),
    ('["r1", "5"]', "expected an object"),
    ({"gold": "5"}, "give request_id or prompt_hash"),
    ({"request_id": "r1", "prompt_hash": H1, "gold": "5"}, "not both"),
    ({"request_id": 7, "gold": "5"}, "request_id must be a request id"),
    ({"request_id": "x" * 33, "gold": "5"}, "1 to 32 characters"),
    ({"prompt_hash": "abc", "gold": "5"}, "64 hex digits"),
    ({"request_id": "r1"}, "gold is missing"),
    ({"request_id": "r1", "gold": True}, "gold must be a string or a number, not true"),
    ({"request_id": "r1", "gold": ["5"]}, "gold must be a string or a number"),
    ({"request_id": "r1", "gold": "  "}, "gold is empty"),
])
def test_bad_line_is_named_and_nothing_is_written(store: tuple[str, Engine], tmp_path: Path,
                                                   line: object, message: str) -> None:
    url, engine = store
    path = labels_file(tmp_path / "bad.jsonl", {"request_id": "r1", "gold": "5"}, line)
    code, _, exc = invoke(["labels", "import", str(path), "--db", url])
    assert code == 2 and str(exc).startswith(f"{path}:2: ") and message in str(exc)
    assert n_labels(engine) == 0


def test_every_line_is_checked_first(store: tuple[str, Engine], tmp_path: Path) -> None:
    url, engine = store
    path = labels_file(tmp_path / "bad.jsonl", {"request_id": "r1", "gold": "5"}, "{",
                       {"request_id": "r2"}, {"request_id": "r1", "gold": "6"},
                       {"request_id": "r3", "gold": "5"})
    code, _, exc = invoke(["labels", "import", str(path), "--db", url])
    assert code == 2 and str(exc) == f"{path}:2: not JSON (Expecting property name enclosed " \
                                      "in double quotes) (and 2 more bad lines)"
    assert n_labels(engine) == 0
    path = labels_file(tmp_path / "twice.jsonl", {"request_id": "r1", "gold": "5"},
                       {"request_id": "r1", "gold": "5"}, {"request_id": "r1", "gold": "6"})
    _, _, exc = invoke(["labels", "import", str(path), "--db", url])
    assert str(exc) == f"{path}:3: request_id 'r1' is labelled '5' on line 1 and '6' here"


def test_unknown_request_ids_list_the_first_few(store: tuple[str, Engine],
                                                tmp_path: Path) -> None:
    url, engine = store
    lines = [{"request_id": "r1", "gold": "5"}] + [
        {"request_id": f"gone{i}", "gold": "5"} for i in range(7)]
    path = labels_file(tmp_path / "gold.jsonl", *lines)
    code, _, exc = invoke(["labels", "import", str(path), "--db", url])
    assert code == 2
    assert str(exc) == (f"{path}: 7 request ids are not in the store (line 2: 'gone0', line 3: "
                        "'gone1', line 4: 'gone2', line 5: 'gone3', line 6: 'gone4', and 2 more); "
                        "nothing was imported")
    assert n_labels(engine) == 0


def test_empty_and_missing_files(store: tuple[str, Engine], tmp_path: Path) -> None:
    url, _ = store
    empty = labels_file(tmp_path / "empty.jsonl", "", "  ")
    assert str(invoke(["labels", "import", str(empty), "--db", url])[2]) == (
        f"{empty}: holds no labels")
    missing = tmp_path / "none.jsonl"
    assert str(invoke(["labels", "import", str(missing), "--db", url])[2]) == (
        f"{missing}: no such file")
    code, out, _ = invoke(["labels", "list", "--db", url])
    assert code == 0 and "no labels imported yet" in out


def test_parse_line_normalises() -> None:
    label = parse_line(json.dumps({"prompt_hash": "AB" * 32, "gold": 0.5}), 4)
    assert (label.line, label.request_id, label.prompt_hash, label.gold) == (
        4, None, "ab" * 32, "0.5")
