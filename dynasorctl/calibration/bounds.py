"""Exact binomial bounds and the risk-control procedures that use them.

The guarantee the operator gets: with probability at least 1 - alpha over the
held-out data, every policy `certify` passes has a true rate of damage (answers
changed, or answers lost) within the target, however many candidates were tried.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def fixed_sequence(
    counts: Sequence[Sequence[tuple[int, int, float]]], alpha: float = 0.05
) -> list[bool]:
    """Fixed-sequence testing: which candidates, in the given order, are certified.

    `counts[i]` lists candidate i's risks as (events, trials, target); the candidate is
    certified while every risk's upper bound at level 1 - alpha is within its target,
    and testing stops at the first candidate that fails. The order must be fixed
    before the held-out data are seen (here: from the tuning split); then the family-wise
    error is at most alpha, so all certified candidates are safe together.
    """
    certified: list[bool] = []
    going = True
    for risks in counts:
        ok = going and all(clopper_pearson_upper(k, n, alpha) <= target for k, n, target in risks)
        certified.append(ok)
        going = ok
    return certified
