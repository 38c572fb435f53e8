"""Fitting the learned stopping rule: a small logistic model over causal probe features.

Trained only on the tuning split. A row is a probe at which a short agreement
window already holds (a moment the policy might stop); its label says whether the
answer there is the one the unstopped run ended with. Standardisation is folded
into the stored weights, so the proxy evaluates the rule with one dot product.
"""

from __future__ import annotations

import numpy as np

from dynasorctl.calibration.replay import Replayer
from proxy.core.policy import FEATURES, CotPolicy, StopRule

# Agreement needed before a probe becomes a training row.
TRAIN_WINDOW = 2


def training_rows(replayer: Replayer, schedule: CotPolicy,
                  runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix and labels at the probes where `schedule` with a short window could stop."""
    probe = schedule.model_copy(update={"window": TRAIN_WINDOW, "agree_share": 1.0, "rule": None,
                                        "min_tokens": 0})
    used = replayer.used(probe)
    sat, key = replayer.window(probe)
    rows = sat & runs[used.run]
    feats = replayer.features(probe)
    x = np.column_stack([feats[name][rows] for name in FEATURES])
    y = (key[rows] == replayer.t.final_key[used.run[rows]]).astype(np.float64)
    return x, y


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0,
                 iterations: int = 30) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method: (weights, bias) on raw features."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = np.column_stack([np.ones(len(x)), (x - mean) / scale])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    weights = w[1:] / scale
    bias = float(w[0] - np.sum(w[1:] * mean / scale))
    return weights, bias


def fit_rule(replayer: Replayer, schedule: CotPolicy, runs: np.ndarray,
             threshold: float = 0.9) -> StopRule | None:
    """The learned rule for this probe schedule, fit on the runs in `runs`; None if no data."""
    x, y = training_rows(replayer, schedule, runs)
    if len(y) < 50 or y.min() == y.max():
        return None
    weights, bias = fit_logistic(x, y)
    return StopRule(features=FEATURES, weights=tuple(round(float(v), 6) for v in weights),
                    bias=round(bias, 6), threshold=threshold)
