"""End to end: enforcing a policy through the proxy does what `evaluate` predicted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynasorctl.traces import PACKAGED_SAMPLE, PACKAGED_SC_SAMPLE, PACKAGED_TRIALS

COT = 'version = 1\nkind = "cot"\nmodel = "*"\n\n[cot]\ninterval = 128\nwindow = 4\n'
SC = 'version = 1\nkind = "sc"\nmodel = "*"\n\n[sc]\nthreshold = 0.5\nmin_samples = 2\n'
# Every new trigger at once: trials at "Wait" (DEER's threshold), a probe after an answer
# stated in the thinking, and the end of thinking.
SIGNALS = ('version = 2\nkind = "cot"\n[cot]\nperiodic = false\nthink_end = true\n'
           '[cot.statement]\nalign = 64\n[cot.transition]\nmin_confidence = 0.999\n')


def _row(out: str, name: str) -> list[float]:
    """The percentages of one row of the table (predicted first, observed last)."""
    match = re.search(rf"^\s*│\s*{name}\s*│(.*)$", out, re.MULTILINE)
    assert match, out
    return [float(x) for x in re.findall(r"([-\d.]+)%", match.group(1))]


def _bench(tmp_path: Path, policy_text: str, traces: Path, speed: str, *more: str) -> str:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text)
    result = subprocess.run(
        [sys.executable, "-m", "dynasorctl", "bench", "enforce", "--traces", str(traces),
         "--policy", str(policy), "--tokens-per-second", speed, *more], capture_output=True,
        text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# 100 tokens a second per stream (4 times a real engine's here): at 500, on a machine busy with
# other work, streams outran their probes, so decisions came late or not at all (stopped 75%
# instead of 87.5%, net saved 13 points short).
@pytest.mark.parametrize(("policy_text", "traces", "speed"),
                         [(COT, PACKAGED_SAMPLE, "100"), (SC, PACKAGED_SC_SAMPLE, "5000")],
                         ids=["chain-of-thought", "self-consistency"])
def test_enforced_accuracy_and_savings_match_evaluate_within_a_point(tmp_path, policy_text, traces, speed):
    out = _bench(tmp_path, policy_text, traces, speed)
    predicted_acc, observed_acc = _row(out, "accuracy, policy")
    predicted_saved, observed_saved = _row(out, "net saved")
    predicted_stop, observed_stop = _row(out, "stopped")
    assert predicted_stop > 50  # the policy really stops most traces: this is not a no-op
    assert abs(observed_acc - predicted_acc) <= 1.0
    if "net saved at the stops" in out:  # chain-of-thought: where the proxy decided to stop
        assert abs(_row(out, "net saved at the stops")[-1] - predicted_saved) <= 1.0
        assert abs(observed_saved - predicted_saved) <= 3.0  # reaction time under load included
    else:
        assert abs(observed_saved - predicted_saved) <= 1.0


def test_every_new_trigger_enforced_decides_as_evaluate_predicted(tmp_path):
    """Trials answered by the replay from the trial file, statement probes, the end of thinking.

    Each trace's decision (stop token and source) is the one `evaluate` makes with the trials
    where the replay's stream has their words; a decision arrives in time as long as its probe
    or trial comes back before the trace ends (at least 1.7 s at 100 tokens a second here).
    """
    out = _bench(tmp_path, SIGNALS, PACKAGED_SAMPLE, "100", "--trials", str(PACKAGED_TRIALS))
    assert re.search(r"decisions as predicted at the replay's positions \(stop token and "
                     r"source\): 32 of 32", out), out
    sources = re.search(r"stops by source: probe (\d+), text (\d+), trial (\d+)", out)
    assert sources and all(int(n) > 0 for n in sources.groups()), out  # all three kinds of stop
    evaluate_acc, replayed_acc, observed_acc = _row(out, "accuracy, policy")
    evaluate_saved, replayed_saved, observed_saved = _row(out, "net saved at the stops")
    assert abs(observed_acc - evaluate_acc) <= 1.0 and observed_acc == replayed_acc
    assert abs(observed_saved - evaluate_saved) <= 1.0
    assert abs(observed_saved - replayed_saved) <= 1.0
    # By the tokens really generated: the proxy reacts within a probe's round trip.
    assert abs(_row(out, "net saved")[-1] - evaluate_saved) <= 3.0


def _bench_error(tmp_path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dynasorctl", "bench", "enforce",
                             "--traces", str(PACKAGED_SAMPLE), *args],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_bench_enforce_checks_its_trials(tmp_path):
    from tests.jsonl import read_records, write_records

    deer = tmp_path / "deer.toml"
    deer.write_text('version = 2\nkind = "cot"\n[cot]\nperiodic = false\n'
                    '[cot.transition]\nmin_confidence = 0.999\n')
    assert "give the trials" in _bench_error(tmp_path, "--policy", str(deer))
    rows = read_records(PACKAGED_TRIALS)
    short = write_records(tmp_path / "short.jsonl.gz", rows[1:])
    assert f"trace {rows[0]['trace_id']} has no trials" in _bench_error(
        tmp_path, "--policy", str(deer), "--trials", str(short))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert f"{bad}:1: not a trial record" in _bench_error(
        tmp_path, "--policy", str(deer), "--trials", str(bad))
