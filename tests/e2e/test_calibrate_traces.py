"""On real traces: the team's development set (`../shared/data/traces/` beside the repo).

Where that folder is not beside the clone, the same checks run on the shipped sample
of those traces (32 of them) rather than not at all.
"""

from __future__ import annotations

import random
from pathlib import Path

from dynasorctl.calibration.observed import load_observations
from dynasorctl.calibration.replay import Replayer
from dynasorctl.calibration.table import build_table
from dynasorctl.traces import PACKAGED_SAMPLE
from proxy.core.policy import FEATURES, CotPolicy, StopRule, first_stop

COT_DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "cot-dev.jsonl.gz"
TRACES = COT_DEV if COT_DEV.exists() else PACKAGED_SAMPLE


def test_replay_equals_first_stop_on_real_traces() -> None:
    rng = random.Random(2)
    everything = load_observations([TRACES])
    runs = rng.sample(everything, min(300, len(everything)))  # type: ignore[arg-type]
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


COT_DEV_TRIALS = COT_DEV.with_name("cot-dev-trials.jsonl.gz")


def test_replay_of_every_trigger_equals_first_stop_on_real_traces() -> None:
    """300 real traces with their trials: the vectorised replay is the decision function."""
    from dynasorctl.calibration.observed import load_trace_files
    from dynasorctl.traces import PACKAGED_TRIALS
    from tests.unit.test_replay_signals import check_policy, random_policy

    trials = COT_DEV_TRIALS if COT_DEV.exists() else PACKAGED_TRIALS
    rng = random.Random(4)
    everything = load_trace_files([TRACES], [trials]).data
    runs = rng.sample(everything, min(300, len(everything)))  # type: ignore[arg-type]
    replayer = Replayer(build_table(runs))
    stopped = sum(check_policy(replayer, random_policy(rng)) for _ in range(12))
    assert stopped > 12 * len(runs) // 4
