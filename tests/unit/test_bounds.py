"""Exact binomial bounds against known values, and the risk-control procedures."""

from __future__ import annotations

import math

import pytest

from dynasorctl.calibration.bounds import (
    binomial_cdf,
    bonferroni_upper,
    clopper_pearson_upper,
    fixed_sequence,
)

# One-sided 95% Clopper-Pearson upper bounds: the 0.95 quantile of Beta(k + 1, n - k),
# as tabulated (and as scipy.stats.beta.ppf(0.95, k + 1, n - k) gives).
KNOWN = [
    (0, 10, 0.2588655508930523),
    (1, 10, 0.3941633024365049),
    (5, 20, 0.4555824040017490),
    (0, 25, 0.1129281021460845),
    (0, 1368, 1 - 0.05 ** (1 / 1368)),
]


@pytest.mark.parametrize(("k", "n", "upper"), KNOWN)
def test_clopper_pearson_known_values(k: int, n: int, upper: float) -> None:
    assert clopper_pearson_upper(k, n, 0.05) == pytest.approx(upper, rel=1e-5)


def test_bound_is_where_the_tail_probability_is_alpha() -> None:
    for k, n in [(2, 1368), (3, 1368), (30, 1368), (7, 50)]:
        p = clopper_pearson_upper(k, n, 0.05)
        assert binomial_cdf(k, n, p) == pytest.approx(0.05, abs=1e-9)
        assert p > k / n


def test_binomial_cdf_exact() -> None:
    n, p = 12, 0.3
    exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(4))
    assert binomial_cdf(3, n, p) == pytest.approx(exact, rel=1e-12)
    assert binomial_cdf(-1, n, p) == 0.0 and binomial_cdf(n, n, p) == 1.0


def test_edges() -> None:
    assert clopper_pearson_upper(5, 5) == 1.0
    assert clopper_pearson_upper(0, 0) == 1.0
    assert clopper_pearson_upper(0, 20, 0.05) == pytest.approx(1 - 0.05 ** (1 / 20))
    with pytest.raises(ValueError):
        clopper_pearson_upper(3, 2)


def test_bound_grows_with_events_and_shrinks_with_trials() -> None:
    assert clopper_pearson_upper(1, 100) < clopper_pearson_upper(2, 100)
    assert clopper_pearson_upper(2, 1000) < clopper_pearson_upper(2, 100)


def test_bonferroni_is_the_bound_at_alpha_over_m() -> None:
    assert bonferroni_upper(2, 500, 0.05, 100) == clopper_pearson_upper(2, 500, 0.0005)
    assert bonferroni_upper(2, 500, 0.05, 100) > clopper_pearson_upper(2, 500, 0.05)


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    target = 0.01
    risks = [[(0, 1000, target)], [(2, 1000, target)], [(40, 1000, target)], [(0, 1000, target)]]
    assert fixed_sequence(risks) == [True, True, False, False]


def test_fixed_sequence_needs_every_risk_within_target() -> None:
    both = [[(0, 1000, 0.01), (30, 1000, 0.01)]]
    assert fixed_sequence(both) == [False]
