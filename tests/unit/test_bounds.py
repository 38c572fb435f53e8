"""Exact binomial bounds, the betting bound on bounded means, and fixed-sequence testing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynasorctl.calibration.bounds import (
    betting_upper,
    binomial_cdf,
    bonferroni_upper,
    clopper_pearson_upper,
    fixed_sequence,
    problem_order,
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
    risks = [[(0.002, target)], [(0.009, target)], [(0.03, target)], [(0.0, target)]]
    assert fixed_sequence(risks) == [True, True, False, False]


def test_fixed_sequence_needs_every_risk_within_target() -> None:
    assert fixed_sequence([[(0.005, 0.01), (0.02, 0.01)]]) == [False]
    assert fixed_sequence([[(0.01, 0.01), (0.0, 0.01)]]) == [True]  # at the target passes


# --- the betting bound ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [20, 228, 1000])
def test_no_damage_is_bounded_near_the_least_any_valid_bound_gives(n: int) -> None:
    # With n values at 0, a Bernoulli(m) sample is all zeros with chance (1 - m)^n, more
    # than alpha below 1 - alpha^(1/n): no valid bound can be lower than that.
    least = 1 - 0.05 ** (1 / n)
    bound = betting_upper(np.zeros(n))
    assert least <= bound <= 1.15 * least
    assert betting_upper(np.zeros(n), lo=-1.0) <= 1.15 * least  # signed values, none lost


def test_bound_follows_the_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.random(300) * 0.2
    bound = betting_upper(x)
    assert x.mean() < bound < x.mean() + 0.05
    assert betting_upper(x, alpha=0.01) >= bound  # more confidence, a wider bound
    assert betting_upper(x[:100]) > bound  # fewer problems, a wider bound
    assert betting_upper(np.ones(50)) == 1.0
    assert betting_upper([]) == 1.0
    assert betting_upper(np.full(200, 0.5)) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError):
        betting_upper([0.5, 1.5])
    with pytest.raises(ValueError):
        betting_upper([-0.5])  # below lo = 0 unless told


def clustered(rng: np.random.Generator, problems: int, runs: int, share_bad: float) -> np.ndarray:
    """Damaged runs per problem: a bad problem damages each run with chance q ~ Beta(1, 2)."""
    bad = rng.random(problems) < share_bad
    return np.where(bad, rng.binomial(runs, rng.beta(1, 2, problems)), 0)


def test_coverage_where_runs_of_one_problem_fail_together() -> None:
    """On clustered damage the run-level bound misses the true rate far more than 5% of
    the time; the problem-level betting bound does not."""
    rng = np.random.default_rng(7)
    problems, runs, trials = 150, 6, 200
    mean = 0.1 / 3  # share of bad problems times the mean of Beta(1, 2)
    run_level = per_problem = 0
    for _ in range(trials):
        damaged = clustered(rng, problems, runs, 0.1)
        run_level += clopper_pearson_upper(int(damaged.sum()), problems * runs) >= mean
        per_problem += betting_upper(damaged / runs) >= mean
    assert run_level / trials < 0.9
    assert per_problem / trials >= 0.93  # 95% nominal, less Monte Carlo slack


def test_coverage_of_signed_values() -> None:
    """Accuracy drop per problem, (lost - gained) / runs in [-1, 1]."""
    rng = np.random.default_rng(8)
    problems, runs, trials = 150, 6, 200
    mean = (0.1 - 0.05) / 3
    covered = 0
    for _ in range(trials):
        net = clustered(rng, problems, runs, 0.1) - clustered(rng, problems, runs, 0.05)
        covered += betting_upper(net / runs, lo=-1.0) >= mean
    assert covered / trials >= 0.93


def test_bets_use_only_earlier_values() -> None:
    """A bet sized after seeing its own value would be rejected by this coverage check:
    values equal to the hypothesised mean plus or minus a half, in random order."""
    rng = np.random.default_rng(9)
    covered = sum(betting_upper(0.25 + 0.5 * (rng.random(60) < 0.5)) >= 0.5 for _ in range(200))
    assert covered / 200 >= 0.93


def test_problem_order_is_fixed_by_the_keys_alone() -> None:
    keys = [f"math/{i:03d}" for i in range(50)]
    order = problem_order(keys)
    assert order == problem_order(list(reversed(keys)) + keys[:5])
    assert sorted(order) == keys and order != keys
    # Keys that sort alike order alike (a trace file's "p/<hash>" against the store's "<hash>").
    assert [f"p/{k}" for k in order] == problem_order([f"p/{k}" for k in keys])


def test_betting_bound_on_thousands_of_clean_problems_does_not_overflow():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upper = betting_upper(np.zeros(20_000))
    assert 0 < upper <= 1.15 * (1 - 0.05 ** (1 / 20_000)) + 1e-4  # within a step of the grid
