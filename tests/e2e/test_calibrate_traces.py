"""On the team's full development traces (`../shared/data/traces/` beside the repo)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dynasorctl.calibration.observed import load_observations
from dynasorctl.calibration.replay import Replayer
from dynasorctl.calibration.table import build_table
from proxy.policy import FEATURES, CotPolicy, StopRule, first_stop

COT_DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "cot-dev.jsonl.gz"


@pytest.fixture(autouse=True, scope="module")
def _traces_present() -> None:
    if not COT_DEV.exists():
        pytest.fail(f"{COT_DEV} is missing: the development traces live in ../shared beside the repo")


def test_replay_equals_first_stop_on_real_traces() -> None:
    rng = random.Random(2)
    runs = rng.sample(load_observations([COT_DEV]), 300)  # type: ignore[arg-type]
    replayer = Replayer(build_table(runs))
    for _ in range(15):
        rule = StopRule(features=FEATURES, weights=tuple(rng.gauss(0, 3) for _ in FEATURES),
                        bias=rng.gauss(0, 1), threshold=0.6) if rng.random() < 0.5 else None
        policy = CotPolicy(interval=rng.choice([64, 128, 256]),
                           early_interval=rng.choice([None, 512]), dense_from=4096,
                           window=rng.choice([2, 4, 8, 16]), agree_share=rng.choice([1.0, 0.75]),
                           min_tokens=rng.choice([0, 2048]), rule=rule)
        stops = replayer.stops(policy)
        for r in range(len(runs)):
            index, _ = first_stop(policy, replayer.t.probes(r))
            want = -1 if index is None else int(replayer.t.run_start[r]) + index
            assert stops.row[r] == want
