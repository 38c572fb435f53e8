"""`dynasorctl calibrate` and `evaluate` end to end on the shipped real traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynasorctl.traces import PACKAGED_SAMPLE
from proxy.core.policy import load_policy_file
from tests.cli import invoke, user_error
from tests.jsonl import read_records, write_records

SC_SAMPLE = PACKAGED_SAMPLE.parent / "sc-sample.jsonl.gz"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    tmp = tmp_path_factory.mktemp("calibrate")
    policy, plot = tmp / "policy.toml", tmp / "frontier.png"
    code, out, exc = invoke(["calibrate", "--traces", str(PACKAGED_SAMPLE), "--max-accuracy-drop",
                             "40", "--out", str(policy), "--plot", str(plot)], tmp / "cache")
    assert exc is None and code == 0, out
    return policy, out, plot


def test_calibrate_reports_and_writes_a_policy(calibrated: tuple[Path, str, Path]) -> None:
    policy, out, plot = calibrated
    assert "never stop" in out and "paper default" in out  # the baselines are always shown
    assert "recommended:" in out and "Savings against damage" in out
    pf = load_policy_file(policy)
    assert pf.kind == "cot" and pf.model == "*" and pf.cot is not None
    assert pf.provenance["guarantee"] == "fixed-sequence testing, 95%, per new problem"
    assert float(pf.provenance["holdout_accuracy_drop_upper95"]) <= 0.40
    assert pf.provenance["target_max_accuracy_drop"] == 0.40
    assert pf.provenance["holdout_problems"] == 16
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_one_decision_per_trace(calibrated: tuple[Path, str, Path],
                                                tmp_path: Path) -> None:
    policy, _, _ = calibrated
    out = tmp_path / "decisions.jsonl"
    code, text, _ = invoke(["evaluate", "--traces", str(PACKAGED_SAMPLE), "--policy", str(policy),
                            "--out", str(out)], tmp_path / "cache")
    assert code == 0 and "net compute saved" in text and "answers lost / gained" in text
    decisions = [json.loads(line) for line in out.read_text().splitlines()]
    traces = read_records(PACKAGED_SAMPLE)
    assert [d["trace_id"] for d in decisions] == [t["trace_id"] for t in traces]
    for d, t in zip(decisions, traces):
        assert set(d) == {"trace_id", "stop_token", "answer", "probes", "probe_tokens", "source"}
        if d["stop_token"] is None:
            assert d["answer"] == t["final_answer"] and d["source"] is None
        elif d["source"] == "probe":
            probe = next(p for p in t["probes"] if p[0] == d["stop_token"])
            assert d["stop_token"] < t["completion_tokens"] and probe
            assert d["probes"] >= 1
        else:  # the end of thinking: no trials were given
            assert d["source"] == "text" and d["stop_token"] < t["completion_tokens"]


def test_decisions_are_causal(calibrated: tuple[Path, str, Path], tmp_path: Path) -> None:
    """Replacing everything after each stop (text, probes, final answer, gold) changes nothing."""
    policy, _, _ = calibrated
    first = tmp_path / "first.jsonl"
    invoke(["evaluate", "--traces", str(PACKAGED_SAMPLE), "--policy", str(policy),
            "--out", str(first)], tmp_path / "cache")
    decisions = [json.loads(line) for line in first.read_text().splitlines()]
    altered = []
    for d, t in zip(decisions, read_records(PACKAGED_SAMPLE)):
        if d["stop_token"] is not None:
            stop = d["stop_token"]
            cut = len(t["text"]) * stop // t["completion_tokens"]
            t["text"] = t["text"][:cut] + "x" * (len(t["text"]) - cut)
            t["probes"] = [p for p in t["probes"] if p[0] <= stop] + [
                [p[0], "999", False, 3] for p in t["probes"] if p[0] > stop]
            t["final_answer"], t["gold"] = "999", "998"
        altered.append(t)
    second = tmp_path / "second.jsonl"
    code, _, _ = invoke(["evaluate", "--traces", str(write_records(tmp_path / "alt.jsonl.gz",
                                                                    altered)),
                         "--policy", str(policy), "--out", str(second)], tmp_path / "cache")
    assert code == 0
    again = [json.loads(line) for line in second.read_text().splitlines()]
    assert again == decisions


def test_self_consistency_evaluate(tmp_path: Path) -> None:
    policy = tmp_path / "sc.toml"
    policy.write_text('version = 1\nkind = "sc"\n[sc]\nthreshold = 0.5\nmin_samples = 2\n')
    out = tmp_path / "sc.jsonl"
    code, text, _ = invoke(["evaluate", "--traces", str(SC_SAMPLE), "--policy", str(policy),
                            "--out", str(out)], tmp_path / "cache")
    assert code == 0 and "every recorded sample" in text
    decisions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(decisions) == len(read_records(SC_SAMPLE))
    for d in decisions:
        assert set(d) == {"program_id", "samples", "answer", "probe_tokens"}
        assert 2 <= d["samples"] <= 8


def test_self_consistency_calibrate(tmp_path: Path) -> None:
    code, out, exc = invoke(["calibrate", "--traces", str(SC_SAMPLE), "--max-answers-lost", "90",
                             "--out", str(tmp_path / "sc.toml")], tmp_path / "cache")
    assert exc is None and code == 0, out
    assert "all samples" in out and "default" in out
    assert load_policy_file(tmp_path / "sc.toml").kind == "sc"


# --- bad input: a clear one-line message and exit code 2 ------------------------------------


def test_missing_trace_file(tmp_path: Path) -> None:
    assert "no such file" in user_error(["calibrate", "--traces", str(tmp_path / "no.jsonl")],
                                        tmp_path)


def test_corrupt_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(read_records(PACKAGED_SAMPLE)[0])
    path.write_text(good + "\n{not json\n")
    assert f"{path}:2: not a trace record" in user_error(["calibrate", "--traces", str(path)],
                                                          tmp_path)
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\nkind = "cot"\n[cot]\n')
    assert f"{path}:2" in user_error(["evaluate", "--traces", str(path), "--policy", str(policy),
                                      "--out", str(tmp_path / "o")], tmp_path)


def test_empty_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert "holds no trace records" in user_error(["calibrate", "--traces", str(path)], tmp_path)


def test_traces_without_probes(tmp_path: Path) -> None:
    rows = read_records(PACKAGED_SAMPLE)
    for row in rows:
        row["probes"] = []
    path = write_records(tmp_path / "bare.jsonl.gz", rows)
    message = user_error(["calibrate", "--traces", str(path), "--max-accuracy-drop", "40"],
                         tmp_path)
    assert "hold no probes" in message


def test_impossible_target(tmp_path: Path) -> None:
    message = user_error(["calibrate", "--traces", str(PACKAGED_SAMPLE)], tmp_path)
    assert message.startswith("--max-accuracy-drop 0.50 points is below what 16 held-out "
                              "problems can certify")
    assert "the problem, not the run, is the independent unit" in message
    assert "raise the target to at least" in message
    # Answers lost with one run a problem: the exact bound, 1 - 0.05^(1/16) = 17.07 points.
    message = user_error(["calibrate", "--traces", str(PACKAGED_SAMPLE), "--max-answers-lost",
                          "10"], tmp_path)
    assert "has a 95% bound of 17.07 points" in message


def test_target_no_sample_this_small_can_certify(tmp_path: Path) -> None:
    message = user_error(["calibrate", "--traces", str(SC_SAMPLE), "--max-accuracy-drop", "90"],
                         tmp_path)
    assert "3 held-out problems" in message and "; add problems (about" in message


@pytest.mark.parametrize("value", ["0", "-1", "100", "250"])
def test_target_out_of_range(tmp_path: Path, value: str) -> None:
    assert "between 0 and 100" in user_error(
        ["calibrate", "--traces", str(PACKAGED_SAMPLE), "--max-accuracy-drop", value], tmp_path)


def test_unknown_model(tmp_path: Path) -> None:
    assert "no records of model" in user_error(
        ["calibrate", "--traces", str(PACKAGED_SAMPLE), "--model", "nope"], tmp_path)


def test_evaluate_bad_policy_files(tmp_path: Path) -> None:
    out = str(tmp_path / "o.jsonl")
    base = ["evaluate", "--traces", str(PACKAGED_SAMPLE), "--out", out, "--policy"]
    assert "no such policy file" in user_error([*base, str(tmp_path / "none.toml")], tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nkind = "cot"\n[cot]\nwindow = -3\n')
    assert "cot.window" in user_error([*base, str(bad)], tmp_path)
    sc = tmp_path / "sc.toml"
    sc.write_text('version = 1\nkind = "sc"\n[sc]\n')
    assert "self-consistency policy" in user_error([*base, str(sc)], tmp_path)
    odd = tmp_path / "odd.toml"
    odd.write_text('version = 1\nkind = "cot"\n[cot]\ninterval = 100\n')
    assert "multiple of 64" in user_error([*base, str(odd)], tmp_path)


def test_policy_scoped_to_another_model_stops_nothing(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\nkind = "cot"\nmodel = "other/model"\n[cot]\n')
    out = tmp_path / "o.jsonl"
    code, text, _ = invoke(["evaluate", "--traces", str(PACKAGED_SAMPLE), "--policy", str(policy),
                            "--out", str(out)], tmp_path / "cache")
    assert code == 0 and "scoped to model" in text
    assert all(json.loads(line)["stop_token"] is None for line in out.read_text().splitlines())
