"""Degenerate inputs of the interval estimates, against the closed forms their docstrings give:
constant samples, single values, NaNs and zero pooled SD. (`verdict` is tested in test_stats.py.)"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import stats

values = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)
sizes = st.integers(1, 12)


def _nan3(x):
    return len(x) == 3 and np.isnan(x).all()


# ----------------------------------------------------------------- bootstrap_ci
@given(c=values, n=sizes, nans=st.integers(0, 3))
def test_bootstrap_ci_of_a_constant_sample_is_the_point(c, n, nans):
    m, lo, hi = stats.bootstrap_ci([c] * n + [np.nan] * nans)
    assert m == pytest.approx(c, rel=1e-12, abs=1e-12)
    assert lo == m == hi


def test_bootstrap_ci_of_nothing_is_nan_and_of_a_spread_sample_is_an_interval():
    assert _nan3(stats.bootstrap_ci([]))
    assert _nan3(stats.bootstrap_ci([np.nan, np.nan]))
    m, lo, hi = stats.bootstrap_ci([1.0, 2.0, np.nan, 3.0, 6.0], n_resamples=500)
    assert m == 3.0 and lo < m < hi and lo >= 1.0 and hi <= 6.0


# ----------------------------------------------------------------- difference_ci
@given(a=values, b=values, n=sizes, m=sizes, paired=st.booleans())
def test_difference_ci_of_two_constant_samples_is_the_point(a, b, n, m, paired):
    m = n if paired else m
    d, lo, hi = stats.difference_ci([a] * n, [b] * m, paired=paired)
    assert d == pytest.approx(a - b, rel=1e-9, abs=1e-6)
    assert lo == d == hi


@pytest.mark.parametrize(
    "a, b, paired, expected",
    [
        ([5.0], [2.0], False, 3.0),  # a single value each
        ([5.0], [2.0], True, 3.0),  # a single pair
        ([5.0], [0.0, 2.0, 4.0], False, 3.0),  # one value against a spread sample: no CI, the point
        ([np.nan, 2.0, 2.0], [1.0, np.nan, 1.0, 1.0], False, 1.0),  # NaNs dropped per sample, then constant
        ([np.nan, 2.0, 4.0, 7.0], [1.0, np.nan, 3.0, 6.0], True, 1.0),  # pair 0 and 1 dropped, a - b == 1
        ([1.0, np.nan, 4.0], [0.0, 3.0, np.nan], True, 1.0),  # one complete pair left
        ([3.0, 3.0, 3.0], [np.nan, 0.5, np.nan], False, 2.5),  # one value left in b
    ],
)
def test_difference_ci_degenerate_cases_are_points(a, b, paired, expected):
    assert stats.difference_ci(a, b, paired=paired) == pytest.approx((expected, expected, expected))


@pytest.mark.parametrize(
    "a, b, paired",
    [
        ([np.nan], [1.0, 2.0], False),
        ([1.0, 2.0], [np.nan, np.nan], False),
        ([1.0, np.nan], [np.nan, 2.0], True),
    ],
)
def test_difference_ci_with_an_empty_sample_is_nan(a, b, paired):
    assert _nan3(stats.difference_ci(a, b, paired=paired))


def test_difference_ci_is_an_interval_when_only_one_sample_or_only_the_pairs_are_constant():
    # a constant, b spread: unpaired CI has width (the rule is "both samples constant")
    d, lo, hi = stats.difference_ci([2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0], n_resamples=500)
    assert d == 0.0 and lo < 0.0 < hi
    # a - b constant but each sample spread: a point when paired, an interval when not
    a, b = [1.0, 2.0, 5.0], [0.0, 1.0, 4.0]
    assert stats.difference_ci(a, b, paired=True) == pytest.approx((1.0, 1.0, 1.0))
    d, lo, hi = stats.difference_ci(a, b, n_resamples=500)
    assert d == pytest.approx(1.0) and lo < 0.9 and hi > 1.1


# ----------------------------------------------------------------- hedges_g_ci
@given(a=values, b=values, n=st.integers(2, 8), m=st.integers(2, 8), nans=st.integers(0, 2))
def test_hedges_g_with_zero_pooled_sd_is_infinite_with_the_sign_of_the_shift(a, b, n, m, nans):
    g = stats.hedges_g_ci([a] * n + [np.nan] * nans, [np.nan] * nans + [b] * m)
    if a > b:
        assert g == (np.inf, np.inf, np.inf)
    elif a < b:
        assert g == (-np.inf, -np.inf, -np.inf)
    else:
        assert _nan3(g)


def test_hedges_g_degenerate_cases():
    # one value against a constant sample: pooled SD 0, still a shift: the point +-inf
    assert stats.hedges_g_ci([3.0], [1.0, 1.0, 1.0]) == (np.inf, np.inf, np.inf)
    assert stats.hedges_g_ci([1.0, 1.0, 1.0, np.nan], [3.0]) == (-np.inf, -np.inf, -np.inf)
    # one value against a spread sample: the finite point J (3 - 1) / s_p, s_p = sqrt(2 / 2), J = 1 - 3 / (4 * 4 - 9)
    g, lo, hi = stats.hedges_g_ci([3.0], [0.0, 1.0, 2.0])
    assert g == pytest.approx((1 - 3 / 7) * 2 / 1.0) and lo == g == hi
    assert _nan3(stats.hedges_g_ci([], [1.0, 2.0]))
    assert _nan3(stats.hedges_g_ci([np.nan, np.nan], [1.0, 2.0]))


def test_hedges_g_of_constant_samples_of_inexact_values():
    # np.mean of n copies of 0.95 is not always exactly 0.95: constancy must be detected exactly,
    # not from a computed SD of ~1e-17 (which made g a finite ratio of rounding errors)
    assert _nan3(stats.hedges_g_ci([0.95, 0.95], [0.95, 0.95, 0.95]))
    assert stats.hedges_g_ci([0.1, 0.1, 0.1], [0.3, 0.3]) == (-np.inf, -np.inf, -np.inf)
