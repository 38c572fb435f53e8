"""`dynasorctl calibrate` on the observation store: the same runs, figures and decisions as on
the trace files the store was filled from, the policy kept as versioned rows, and clear errors.

The store is filled as the proxy fills it (`write_records`), one request per packaged trace
with its probes, plus requests calibration must leave out.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dynasorctl.calibration import targets
from dynasorctl.calibration.bounds import clopper_pearson_upper
from dynasorctl.calibration.damage import least_upper
from dynasorctl.calibration.learn import fit_rule
from dynasorctl.calibration.observed import run_from_trace
from dynasorctl.calibration.replay import Replayer
from dynasorctl.calibration.search import SCHEDULES, Target, split_by_group
from dynasorctl.calibration.store_source import load_programs, load_runs
from dynasorctl.calibration.table import build_table
from dynasorctl.traces import PACKAGED_SAMPLE, load
from proxy.core.policy import FEATURES, CotPolicy, parse_policy_file
from proxy.pipeline.record import prompt_hash
from proxy.store import db
from proxy.store.models import PolicyRow
from proxy.store.recorder import Record, write_records
from tests.cli import invoke, user_error
from tests.jsonl import read_records
from tests.jsonl import write_records as write_trace_file

SC_SAMPLE = PACKAGED_SAMPLE.parent / "sc-sample.jsonl.gz"
TEXT_FEATURES = ("think_closed", "answer_seen", "hesitations", "verifications")
START = datetime(2026, 1, 1, tzinfo=UTC)


def body(problem: str, model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": problem}], "stream": True}


def request_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def request(rid: str, i: int, model: str, problem: str, **fields) -> dict:
    """A request row with every column `proxy.record.build_record` fills."""
    b = body(problem, model)
    row = {"id": rid, "created_at": START + timedelta(seconds=i), "model": model,
           "kind": "chat", "upstream": "http://replay", "mode": "observe", "stream": True,
           "n": 1, "status_code": 200, "error": None, "prompt_tokens": None,
           "completion_tokens": None, "finish_reason": "stop", "final_answer": None,
           "latency_ms": 1000.0, "ttft_ms": 50.0, "program_id": None, "probed": True,
           "probe_count": 0, "probe_tokens": 0, "prompt_hash": prompt_hash("chat", b),
           "completion_hash": None, "prompt_text": json.dumps(b["messages"]),
           "completion_text": None}
    assert set(fields) <= set(row)
    return {**row, **fields}


def probe_rows(rid: str, probes: list[list], choice: int = 0) -> list[dict]:
    """The trace's probes as ok rows, with an error and a cancelled probe calibration skips."""
    rows = [{"request_id": rid, "choice_index": choice, "position": p[0], "answer": p[1],
             "hesitant": not p[2] if len(p) > 2 else False,
             "output_tokens": p[3] if len(p) > 3 else 0, "latency_ms": 5.0, "status": "ok",
             "certaindex": None} for p in probes]
    rows.append({"request_id": rid, "choice_index": choice, "position": 1, "answer": None,
                 "hesitant": False, "output_tokens": 0, "latency_ms": 5.0, "status": "error",
                 "certaindex": None})
    rows.append({**rows[-1], "position": 7, "answer": "999", "status": "cancelled"})
    return rows


def cot_records(traces: list[dict], text: bool | list[bool] = True) -> list[Record]:
    """One probed request per trace, then requests that are not calibration runs."""
    out = []
    for i, t in enumerate(traces):
        keep = text if isinstance(text, bool) else text[i]
        rid = request_id(t["trace_id"])
        out.append(Record(request(
            rid, i, t["model"], t["problem"], completion_tokens=t["completion_tokens"],
            prompt_tokens=t.get("prompt_tokens"), final_answer=t["final_answer"],
            probe_count=len(t["probes"]), completion_text=t["text"] if keep else None,
            completion_hash=hashlib.sha256(t["text"].encode()).hexdigest()),
            probe_rows(rid, t["probes"])))
    t = traces[0]
    noise = [
        {"status_code": 500, "error": "upstream failed"},
        {"probed": False},
        {"finish_reason": None},  # the client went away
        {"program_id": "p-1"},  # a self-consistency sample
    ]
    for j, fields in enumerate(noise):
        rid = request_id(f"noise{j}")
        out.append(Record(request(rid, 1000 + j, t["model"], t["problem"],
                                  completion_tokens=t["completion_tokens"],
                                  final_answer="999", **fields),
                          probe_rows(rid, t["probes"])))
    return out


def sc_records(programs: list[dict]) -> list[Record]:
    """Each sample its own streamed request sharing the program id (X-Dynasor-Program)."""
    out = []
    for i, p in enumerate(programs):
        for k, s in enumerate(p["samples"]):
            rid = request_id(f"{p['program_id']}#{k}")
            sample = {"program_id": p["program_id"], "request_id": rid, "choice_index": 0,
                      "sample_index": k, "answer": s["final_answer"], "answer_group": 0,
                      "completion_tokens": s["completion_tokens"], "finish_reason": "stop",
                      "certaindex": 0.0, "created_at": START}
            out.append(Record(request(rid, 100 * i + k, p["model"], p["problem"],
                                      program_id=p["program_id"],
                                      completion_tokens=s["completion_tokens"],
                                      final_answer=s["final_answer"]),
                              probe_rows(rid, s["probes"]), [sample]))
    return out


def keyed_by_prompt(rows: list[dict]) -> list[dict]:
    """The traces with each problem named by its prompt hash, as the store names it, and
    without the source's own grading, which the store has no place for: the seeded split
    then puts the same problems on each side and both grade the final answer alike."""
    out = []
    for r in rows:
        out.append({**r, "dataset": "p", "problem_id": prompt_hash("chat", body(r["problem"],
                                                                               r["model"]))})
        out[-1].pop("final_correct", None)
        for s in out[-1].get("samples", []):
            s.pop("final_correct", None)
    return out


def new_store(path: Path, records: list[Record]) -> str:
    url = f"sqlite:///{path}"
    write_records(db.open_store(url), records)
    return url


def gold_file(path: Path, rows: list[tuple[str, str]], key: str = "request_id") -> Path:
    path.write_text("".join(json.dumps({key: k, "gold": g}) + "\n" for k, g in rows))
    return path


def comparable(output: str) -> str:
    """A report without what legitimately differs: timing and where the policy went."""
    lines = [line for line in output.splitlines() if not line.startswith("policy ")]
    return re.sub(r"\d+\.\d s\.", "s.", "\n".join(lines))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict:
    """A labelled store and the same traces, each calibrated once; the store twice."""
    tmp = tmp_path_factory.mktemp("labelled")
    traces = read_records(PACKAGED_SAMPLE)
    url = new_store(tmp / "s.db", cot_records(traces))
    code, out, exc = invoke(["labels", "import", str(gold_file(
        tmp / "gold.jsonl", [(request_id(t["trace_id"]), t["gold"]) for t in traces])),
        "--db", url], cache)
    assert exc is None and code == 0, out
    assert "32 recorded requests labelled" in out
    keyed = write_trace_file(tmp / "keyed.jsonl.gz", keyed_by_prompt(traces))
    target = ["--max-accuracy-drop", "60"]
    runs = {}
    for name, source in (("traces", ["--traces", str(keyed)]), ("db", ["--db", url]),
                         ("db again", ["--db", url])):
        policy = tmp / f"{name}.toml"
        code, out, exc = invoke(["calibrate", *source, *target, "--out", str(policy)], cache)
        assert exc is None and code == 0, out
        runs[name] = (out, policy.read_text())
    return {"url": url, "runs": runs}


def test_store_runs_are_the_trace_runs() -> None:
    traces = read_records(PACKAGED_SAMPLE)
    engine = db.open_store("sqlite://")
    write_records(engine, cot_records(traces))
    found = load_runs(engine)
    expected = [run_from_trace(t) for t in load(PACKAGED_SAMPLE)]
    assert len(found.runs) == len(expected) == 32  # the four other requests are left out
    assert found.with_text == 32 and found.labelled == 0 and not found.text_dropped
    for run, want, t in zip(found.runs, expected, traces):
        assert run.run_id == request_id(t["trace_id"])
        assert run.group == prompt_hash("chat", body(t["problem"], t["model"]))
        assert (run.model, run.probes, run.final_answer, run.main_tokens, run.text) == (
            want.model, want.probes, want.final_answer, want.main_tokens, want.text)
        assert run.gold is None and run.final_correct is None
    assert len(load_runs(engine, model="Qwen/Qwen3-8B").runs) == sum(
        t["model"] == "Qwen/Qwen3-8B" for t in traces)


def test_calibrate_db_decides_as_calibrate_traces(labelled: dict) -> None:
    (traces_out, traces_policy), (db_out, db_policy) = (labelled["runs"]["traces"],
                                                        labelled["runs"]["db"])
    assert "recommended:" in db_out and "note:" not in db_out
    assert comparable(db_out) == comparable(traces_out)  # every candidate's figures
    a, b = parse_policy_file(traces_policy), parse_policy_file(db_policy)
    # The trace files record how their probes were taken; the store's probes were the proxy's.
    assert a.cot is not None and a.cot.probe is not None and b.cot is not None
    assert a.cot.model_copy(update={"probe": None}) == b.cot
    assert a.kind == b.kind == "cot" and a.model == b.model == "*"
    skip = {"created", "source"}
    assert {k: v for k, v in a.provenance.items() if k not in skip} == {
        k: v for k, v in b.provenance.items() if k not in skip}
    assert b.provenance["source"].startswith("store sqlite:///")
    assert "32 probed requests, 32 labelled" in b.provenance["source"]


def test_recommended_policy_is_stored_inactive_and_versioned(labelled: dict) -> None:
    assert "version 1 (inactive)" in labelled["runs"]["db"][0]
    assert "version 2 (inactive)" in labelled["runs"]["db again"][0]
    with Session(db.open_store(labelled["url"])) as s:
        rows = s.scalars(select(PolicyRow).order_by(PolicyRow.version)).all()
    assert [(r.kind, r.model, r.version, r.active) for r in rows] == [
        ("cot", "*", 1, False), ("cot", "*", 2, False)]
    assert rows[0].policy_toml == labelled["runs"]["db"][1]  # what --out wrote
    assert rows[1].policy_toml == labelled["runs"]["db again"][1]
    assert rows[0].source.startswith("store sqlite:///") and rows[0].note is None


def test_without_text_learned_rules_decide_on_probes_alone(tmp_path: Path, cache: Path) -> None:
    traces = read_records(PACKAGED_SAMPLE)
    engine = db.open_store("sqlite://")
    half = [i % 2 == 0 for i in range(len(traces))]  # --store-text on for a while only
    write_records(engine, cot_records(traces, text=half))
    found = load_runs(engine)
    assert found.with_text == 16 and found.text_dropped
    assert all(r.text is None for r in found.runs)  # all or nothing, never a mixture
    replayer = Replayer(build_table(found.runs))
    tune = split_by_group([r.group for r in found.runs], 0)
    fitted = [fit_rule(replayer, CotPolicy(**schedule), tune) for _, schedule in SCHEDULES]
    assert any(rule is not None for rule in fitted)
    for rule in filter(None, fitted):
        weights = dict(zip(rule.features, rule.weights))
        assert rule.features == FEATURES and all(weights[f] == 0.0 for f in TEXT_FEATURES)
        assert any(weights[f] != 0.0 for f in FEATURES if f not in TEXT_FEATURES)

    url = new_store(tmp_path / "s.db", cot_records(traces, text=False))
    code, out, exc = invoke(["calibrate", "--db", url, "--max-answer-change", "40",
                             "--note", "no text"], cache)
    assert exc is None and code == 0, out
    assert "32 of 32 requests were stored without their text" in out
    assert "no record has a gold answer" in out and "answers changed" in out
    with Session(db.open_store(url)) as s:
        row = s.scalars(select(PolicyRow)).one()
    assert (row.version, row.active, row.note) == (1, False, "no text")
    rule = parse_policy_file(row.policy_toml).cot.rule  # type: ignore[union-attr]
    if rule is not None:
        assert all(w == 0.0 for f, w in zip(rule.features, rule.weights) if f in TEXT_FEATURES)


def test_self_consistency_from_the_store(tmp_path: Path, cache: Path) -> None:
    programs = read_records(SC_SAMPLE)
    url = new_store(tmp_path / "s.db", sc_records(programs))
    hashes = [prompt_hash("chat", body(p["problem"], p["model"])) for p in programs]
    found = load_programs(db.open_store(url))
    assert [p.program_id for p in found] == sorted(p["program_id"] for p in programs)
    assert load_runs(db.open_store(url)).runs == []  # program members are not CoT runs
    code, out, exc = invoke(["labels", "import", str(gold_file(
        tmp_path / "gold.jsonl", [(h, p["gold"]) for h, p in zip(hashes, programs)],
        "prompt_hash")), "--db", url], cache)
    assert exc is None and "48 recorded requests labelled" in out, out
    keyed = write_trace_file(tmp_path / "keyed.jsonl.gz", keyed_by_prompt(programs))
    outputs = []
    for source in (["--traces", str(keyed)], ["--db", url, "--kind", "sc"]):
        code, out, exc = invoke(["calibrate", *source, "--max-answers-lost", "90"], cache)
        assert exc is None and code == 0, out
        outputs.append(out)
    assert comparable(outputs[0]) == comparable(outputs[1])
    assert "sc policy for model '*', version 1 (inactive)" in outputs[1]


# --- not enough to calibrate on: one-line errors, exit 2 -------------------------------------


def test_empty_store(tmp_path: Path, cache: Path) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    message = user_error(["calibrate", "--db", url], cache)
    need = targets.problems_needed(Target(None, 0.005), 0.05)  # no labels: answers changed
    assert message.startswith(f"the store has 0 probed requests of 0 problems (distinct "
                              f"prompts); calibration needs at least {need} problems for a "
                              "0.50-point target")
    assert f"record more traffic into {url}," in message and "--traces FILE" in message
    # Without --traces the default store is read (here under the test's XDG_DATA_HOME).
    default = f"sqlite:///{tmp_path}/xdg/dynasor/dynasor.db"
    assert user_error(["calibrate"], cache) == message.replace(url, default)
    assert "0 self-consistency programs" in user_error(["calibrate", "--kind", "sc", "--db", url],
                                                       cache)


def test_too_few_runs(tmp_path: Path, cache: Path) -> None:
    url = new_store(tmp_path / "s.db", cot_records(read_records(PACKAGED_SAMPLE)[:5]))
    message = user_error(["calibrate", "--db", url, "--max-answers-lost", "40"], cache)
    assert message.startswith("the store has 5 probed requests of 5 problems (distinct "
                              "prompts); calibration needs at least 12 problems for a "
                              "40.00-point target")
    assert "of model 'nope'" in user_error(
        ["calibrate", "--db", url, "--model", "nope", "--max-answers-lost", "40"], cache)
    with Session(db.open_store(url)) as s:
        assert s.scalars(select(PolicyRow)).all() == []


def test_traces_and_store_together(tmp_path: Path, cache: Path) -> None:
    assert "not both" in user_error(["calibrate", "--traces", str(PACKAGED_SAMPLE), "--db",
                                     f"sqlite:///{tmp_path}/s.db"], cache)
    assert "self-consistency records" in user_error(
        ["calibrate", "--traces", str(SC_SAMPLE), "--kind", "cot"], cache)


def test_needed_problems_follow_the_target() -> None:
    """Half the problems needed, held out and undamaged, just meet the target; one fewer not."""
    for limit in (0.005, 0.05, 0.4):
        for target, measure in ((Target(limit, None), "accuracy drop"),
                                (Target(None, None, limit), "answers lost")):
            for one_each in (True, False):
                held = targets.problems_needed(target, 0.05, one_each) // 2
                assert least_upper(held, measure, one_each) <= limit
                assert least_upper(held - 1, measure, one_each) > limit
    # Answers lost or changed, one run a problem: the exact binomial bound.
    for limit in (0.005, 0.4):
        held = targets.problems_needed(Target(None, limit), 0.05) // 2
        assert clopper_pearson_upper(0, held) <= limit < clopper_pearson_upper(0, held - 1)
    # The signed accuracy drop is bounded by betting, which needs more problems than that.
    assert targets.problems_needed(Target(0.005, None), 0.05) > targets.problems_needed(
        Target(None, None, 0.005), 0.05)
