"""Trials and the text signals through `calibrate` and `evaluate`, on the shipped sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynasorctl.traces import PACKAGED_SAMPLE, PACKAGED_TRIALS
from proxy.core.policy import load_policy_file
from proxy.core.text import think_end, token_position
from tests.cli import invoke, user_error
from tests.jsonl import read_records, write_records

DEER = ('version = 2\nkind = "cot"\n[cot]\nperiodic = false\nthink_end = true\n'
        '[cot.transition]\nmin_confidence = 0.999\n')
TEXT = 'version = 2\nkind = "cot"\n[cot]\nperiodic = false\nthink_end = true\n'


def evaluate(tmp_path: Path, policy_text: str, traces: Path = PACKAGED_SAMPLE,
             trials: Path | None = PACKAGED_TRIALS, extra: tuple[str, ...] = ()) -> list[dict]:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text)
    out = tmp_path / "decisions.jsonl"
    args = ["evaluate", "--traces", str(traces), "--policy", str(policy), "--out", str(out)]
    if trials is not None:
        args += ["--trials", str(trials)]
    code, text, exc = invoke([*args, *extra], tmp_path / "cache")
    assert exc is None and code == 0, text
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_calibrate_with_trials_writes_a_policy_that_takes_them(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    code, out, exc = invoke(["calibrate", "--traces", str(PACKAGED_SAMPLE), "--trials",
                             str(PACKAGED_TRIALS), "--max-accuracy-drop", "40", "--out",
                             str(policy)], tmp_path / "cache")
    assert exc is None and code == 0, out
    assert "never stop" in out and "paper default" in out and "(previous best)" in out
    assert "trial>=" in out
    pf = load_policy_file(policy)
    assert pf.version == 2 and pf.cot is not None
    rule = pf.cot.transition
    if rule is not None:  # trials taken as they were recorded
        assert rule.words == ("wait",) and rule.max_trials == 30
        assert rule.probe.suffix == "\n**Final Answer**\n\\boxed" and rule.probe.temperature == 0
    if pf.cot.periodic or pf.cot.statement:  # probes taken as they were recorded
        assert pf.cot.probe is not None and pf.cot.probe.max_tokens == 32


def test_trial_stops_are_recorded_trials(tmp_path: Path) -> None:
    decisions = evaluate(tmp_path, DEER)
    trials = {r["trace_id"]: r["trials"] for r in read_records(PACKAGED_TRIALS)}
    sources = {d["source"] for d in decisions}
    assert {"trial", "text"} <= sources
    for d in decisions:
        assert set(d) == {"trace_id", "stop_token", "answer", "probes", "probe_tokens", "source"}
        recorded = trials[d["trace_id"]]
        if d["source"] == "trial":
            hit = next(t for t in recorded if t[0] == d["stop_token"])
            assert hit[1] == d["answer"] and hit[2] >= 0.999
            before = [t for t in recorded if t[0] <= d["stop_token"]]
            assert d["probes"] == len(before) and d["probe_tokens"] == sum(t[3] for t in before)
            assert all(t[2] < 0.999 or not t[1] for t in before[:-1])


def test_text_stops_are_at_think_end_with_the_written_answer(tmp_path: Path) -> None:
    decisions = evaluate(tmp_path, TEXT, trials=None)
    traces = {t["trace_id"]: t for t in read_records(PACKAGED_SAMPLE)}
    stopped = [d for d in decisions if d["stop_token"] is not None]
    assert stopped and all(d["source"] == "text" and d["probes"] == 0 for d in stopped)
    for d in stopped:
        t = traces[d["trace_id"]]
        offset, answer = think_end(t["text"])  # type: ignore[misc]
        assert d["stop_token"] == token_position(offset, len(t["text"]), t["completion_tokens"])
        assert d["answer"] == answer and answer in t["text"][: t["text"].index("</think>")]


def test_trial_decisions_are_causal(tmp_path: Path) -> None:
    """Changing every trial, probe and character after each stop changes no decision."""
    first = evaluate(tmp_path, DEER)
    traces, trials = read_records(PACKAGED_SAMPLE), read_records(PACKAGED_TRIALS)
    for d, t, tr in zip(first, traces, trials):
        if d["stop_token"] is None:
            continue
        stop = d["stop_token"]
        cut = len(t["text"]) * stop // t["completion_tokens"]
        if d["source"] == "text":
            cut = t["text"].index("</think>") + len("</think>")  # what the end of thinking read
        t["text"] = t["text"][:cut] + "x" * (len(t["text"]) - cut)
        t["final_answer"] = "999"
        tr["trials"] = [x for x in tr["trials"] if x[0] <= stop] + [
            [x[0], "999", 1.0, 2, x[4]] for x in tr["trials"] if x[0] > stop]
    again = evaluate(tmp_path, DEER, write_records(tmp_path / "t.jsonl.gz", traces),
                     write_records(tmp_path / "tr.jsonl.gz", trials))
    assert again == first


def test_held_out_keeps_the_problems_calibration_never_saw(tmp_path: Path) -> None:
    every = evaluate(tmp_path, TEXT, trials=None)
    held = evaluate(tmp_path, TEXT, trials=None, extra=("--held-out", "--seed", "0"))
    assert 0 < len(held) < len(every)
    assert all(d in every for d in held)
    policy = tmp_path / "p.toml"
    policy.write_text(TEXT)
    message = user_error(["evaluate", "--traces", str(PACKAGED_SAMPLE), "--policy", str(policy),
                          "--out", str(tmp_path / "o"), "--held-out"], tmp_path)
    assert "give --seed" in message


def test_probes_past_the_end_are_dropped_and_said_once(tmp_path: Path) -> None:
    rows = read_records(PACKAGED_SAMPLE)
    for row in rows[:3]:
        end = row["completion_tokens"]
        row["probes"] += [[end, "12345", True, 5], [end + 64, "12345", True, 5]]
    traces = write_records(tmp_path / "past.jsonl.gz", rows)
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\nkind = "cot"\n[cot]\nwindow = 1\n')
    out = tmp_path / "o.jsonl"
    code, text, _ = invoke(["evaluate", "--traces", str(traces), "--policy", str(policy),
                            "--out", str(out)], tmp_path / "cache")
    assert code == 0
    assert text.count("at or past the end of their run") == 1 and "6 recorded probes" in text
    assert all(json.loads(line)["answer"] != "12345" for line in out.read_text().splitlines())


# --- bad trial files: one clear line, exit 2 ----------------------------------------------


def _cal(trials: Path, tmp_path: Path) -> str:
    return user_error(["calibrate", "--traces", str(PACKAGED_SAMPLE), "--trials", str(trials),
                       "--max-accuracy-drop", "40"], tmp_path)


def test_missing_trial_file(tmp_path: Path) -> None:
    assert "no such file" in _cal(tmp_path / "none.jsonl", tmp_path)


def test_corrupt_trial_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(read_records(PACKAGED_TRIALS)[0]) + "\n{not json\n")
    assert f"{path}:2: not a trial record" in _cal(path, tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.pop("inducer"), "missing field 'inducer'"),
    (lambda r: r.update(trials=[[1, "2", 1.5, 3, 4]]), "not a probability"),
    (lambda r: r.update(trials=[["x", "2", 0.5, 3, 4]]), "bad token position"),
    (lambda r: r.update(trials="none"), "with a trials list"),
])
def test_malformed_trial_records(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    rows = read_records(PACKAGED_TRIALS)
    change(rows[1])
    path = write_records(tmp_path / "t.jsonl.gz", rows)
    got = _cal(path, tmp_path)
    assert f"{path}:2: not a trial record" in got and message in got


def test_trace_without_trials_is_named(tmp_path: Path) -> None:
    rows = read_records(PACKAGED_TRIALS)
    missing = rows.pop(5)["trace_id"]
    got = _cal(write_records(tmp_path / "t.jsonl.gz", rows), tmp_path)
    assert f"trace {missing} has no trials" in got


def test_trials_twice_and_inconsistent_setups(tmp_path: Path) -> None:
    rows = read_records(PACKAGED_TRIALS)
    assert "has trials twice" in _cal(write_records(tmp_path / "a.jsonl.gz", rows + rows[:1]),
                                      tmp_path)
    rows[3]["inducer"] = "Answer:"
    assert "trials taken differently" in _cal(write_records(tmp_path / "b.jsonl.gz", rows),
                                              tmp_path)


def test_trials_where_they_cannot_go(tmp_path: Path) -> None:
    sc = PACKAGED_SAMPLE.parent / "sc-sample.jsonl.gz"
    assert "not self-consistency" in user_error(
        ["calibrate", "--traces", str(sc), "--trials", str(PACKAGED_TRIALS)], tmp_path)
    assert "not with a store" in user_error(
        ["calibrate", "--db", f"sqlite:///{tmp_path}/s.db", "--trials", str(PACKAGED_TRIALS)],
        tmp_path)


def test_a_trial_policy_needs_matching_trials(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    base = ["evaluate", "--traces", str(PACKAGED_SAMPLE), "--policy", str(policy), "--out",
            str(tmp_path / "o")]
    policy.write_text(DEER)
    assert "give the trials" in user_error(base, tmp_path)
    policy.write_text(DEER + 'words = ["hmm"]\n')
    assert "recorded at 'Wait'" in user_error([*base, "--trials", str(PACKAGED_TRIALS)], tmp_path)
    policy.write_text(DEER + "max_trials = 31\n")
    assert "at most 30" in user_error([*base, "--trials", str(PACKAGED_TRIALS)], tmp_path)
    policy.write_text(DEER + '[cot.transition.probe]\nsuffix = "Answer:"\nlogprobs = true\n')
    assert "suffix 'Answer:'" in user_error([*base, "--trials", str(PACKAGED_TRIALS)], tmp_path)


def test_evaluate_counts_stops_by_source(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(DEER)
    out = tmp_path / "o.jsonl"
    code, text, _ = invoke(["evaluate", "--traces", str(PACKAGED_SAMPLE), "--trials",
                            str(PACKAGED_TRIALS), "--policy", str(policy), "--out", str(out)],
                           tmp_path / "cache")
    decisions = [json.loads(line) for line in out.read_text().splitlines()]
    trials = sum(d["source"] == "trial" for d in decisions)
    texts = sum(d["source"] == "text" for d in decisions)
    assert code == 0 and f"trial {trials}, text {texts}" in text
