"""Upper confidence bounds on damage, and the fixed-sequence test that uses them.

The guarantee the operator gets: with probability at least 1 - alpha over the
held-out problems, every policy `certify` passes has a true mean damage per new
problem within the target, however many candidates were searched.

The independent unit is the problem, not the run: the runs of one problem (two
models, three seeds) succeed or fail together (design effects of 1.6 to 3.7 on the
development traces), so a bound that counts runs as independent trials is too
tight. `betting_upper` bounds the mean of one value per problem in [lo, hi];
`clopper_pearson_upper` is exact when each value is a single 0/1 outcome.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Largest share of the capital a bet may risk; WSR use 1/2 to 3/4. Nearer 1 is tighter
# when most problems show no damage (the usual case) and costs little otherwise.
BET_FRACTION = 0.9
PROBLEM_ORDER_SEED = 20230417

def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    terms = [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(k: int, n: int, alpha: float = 0.05) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound, level 1 - alpha, on a rate."""
    if n <= 0:
        return 1.0
    if not 0 <= k <= n:
        raise ValueError(f"{k} events out of {n} trials")
    if k == n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)  # closed form
    lo, hi = k / n, 1.0
    for _ in range(80):  # P(X <= k; p) falls as p grows: bisect for alpha
        mid = (lo + hi) / 2
        if binomial_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def bonferroni_upper(k: int, n: int, alpha: float, candidates: int) -> float:
    """The upper bound that holds simultaneously for `candidates` policies (Bonferroni)."""
    return clopper_pearson_upper(k, n, alpha / max(1, candidates))


def _grid(lo: float, hi: float) -> np.ndarray:
    """Candidate bounds in [lo, hi): steps of 0.01 point up to 20 points of damage, 0.1 above."""
    coarse = np.arange(lo, hi, 1e-3)
    a, b = max(lo, 0.0), min(hi, 0.2)
    fine = np.arange(a, b, 1e-4) if a < b else np.empty(0)
    grid = np.unique(np.round(np.concatenate([coarse, fine]), 12))
    return grid[(grid >= lo) & (grid < hi)]


def betting_upper(x: Sequence[float] | np.ndarray, alpha: float = 0.05, lo: float = 0.0,
                  hi: float = 1.0) -> float:
    """Upper confidence bound, level 1 - alpha, on the mean of iid values in [lo, hi].

    Testing by betting (Waudby-Smith & Ramdas 2023, "Estimating means of bounded random
    variables by betting"): for each candidate bound m, a gambler who doubts that the
    mean is at least m bets on each value in turn, in the order given, which must be
    fixed before the values are seen. Her capital prod(1 + lambda_i (m - x_i)) is a
    nonnegative supermartingale when the mean is at least m, so by Ville's inequality
    it ever reaches 1/alpha with probability at most alpha; m is rejected if it does.
    Bets are predictable (aGRAPA: from the values before i only), capped at
    BET_FRACTION of the capital. The bound is the grid point just above the largest m
    not rejected. With n values all at lo it is near 1 - alpha**(1/n), the least any
    valid bound can give.
    """
    values = np.asarray(x, float)
    if values.size and (values.min() < lo - 1e-12 or values.max() > hi + 1e-12):
        raise ValueError(f"values outside [{lo}, {hi}]")
    if values.size == 0:
        return hi
    m = _grid(lo, hi)
    cap_lambda = BET_FRACTION / (hi - m)
    capital = np.ones_like(m)
    best = np.ones_like(m)
    # Running mean and variance with a small prior weight at lo: bet boldly from the
    # start, since damage is usually rare (any predictable bet keeps the bound valid).
    weight, total, squares = 0.1, 0.1 * lo, 0.1 * (hi - lo) ** 2 / 4
    for i, xi in enumerate(values):
        mean, var = total / (weight + i), squares / (weight + i)
        gap = m - mean
        bet = np.clip(gap / (var + gap * gap), 0.0, cap_lambda)
        capital *= 1.0 + bet * (m - xi)
        np.maximum(best, capital, out=best)
        # A rejected m stays rejected: holding its capital at the threshold changes no
        # verdict and keeps long runs of small damage from overflowing.
        np.minimum(capital, 1.0 / alpha, out=capital)
        total += xi
        squares += (xi - total / (weight + i + 1)) ** 2
    kept = np.flatnonzero(best < 1.0 / alpha)  # m = lo is never rejected: capital <= 1
    k = int(kept[-1])
    return float(m[k + 1]) if k + 1 < m.size else hi


def problem_order(keys: Sequence[str]) -> list[str]:
    """The problems in the order the bounds read them: a fixed shuffle of their sorted keys.

    It depends on the keys alone, so it is fixed before any outcome is seen; shuffled so
    that how problems are named (dataset, difficulty) does not drift along the order, and
    keys that sort alike (a trace file's "p/<hash>" and the store's "<hash>") order alike.
    """
    unique = sorted(set(keys))
    return [unique[i] for i in np.random.default_rng(PROBLEM_ORDER_SEED).permutation(len(unique))]


def fixed_sequence(risks: Sequence[Sequence[tuple[float, float]]]) -> list[bool]:
    """Fixed-sequence testing: which candidates, in the given order, are certified.

    `risks[i]` lists candidate i's risks as (upper bound at level 1 - alpha, target);
    the candidate is certified while every bound is within its target, and testing
    stops at the first candidate that fails. The order must be fixed before the
    held-out data are seen (here: from the tuning split); then the family-wise error
    is at most alpha, so all certified candidates are safe together.
    """
    certified: list[bool] = []
    going = True
    for bounds in risks:
        ok = going and all(upper <= target for upper, target in bounds)
        certified.append(ok)
        going = ok
    return certified
