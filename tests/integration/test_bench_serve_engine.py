"""`dynasorctl bench serve` on the real in-process vLLM engine: a few programs, two arms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dynasorctl.traces import PACKAGED_SAMPLE, PACKAGED_SC_SAMPLE

ROOT = Path(__file__).resolve().parents[2]


def test_bench_serve_runs_programs_on_the_engine_through_admission():
    args = [str(Path(sys.executable).with_name("dynasorctl")), "bench", "serve", "--arms",
            "fcfs,dynasor",
            "--rates", "0.5", "--seeds", "1", "--programs", "6", "--length-scale", "0.015625",
            "--capacity", "4", "--cost", "0.03,0.0023,0.0016,2.7e-6",  # no step-cost fit
            "--sc-traces", str(PACKAGED_SC_SAMPLE), "--cot-traces",
            str(PACKAGED_SAMPLE), "--format", "json"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert data["mode"].startswith("real engine")
    fcfs, dynasor = data["arms"]["fcfs"], data["arms"]["dynasor"]
    for arm in (fcfs, dynasor):
        assert arm["at_reference"]["done"] == 6  # every program finished on the engine
        assert arm["simulated_attainment"] is not None  # and the simulator ran the same cells
        assert 0 <= arm["simulated_max_gap"] <= 1
        assert arm["scheduler_us_per_request"] > 0
    assert fcfs["at_reference"]["stopped"] == 0 and fcfs["at_reference"]["probe_tokens"] == 0
    assert dynasor["at_reference"]["tokens"] < fcfs["at_reference"]["tokens"]
