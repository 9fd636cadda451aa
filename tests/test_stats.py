"""Statistics checked against known answers: CI coverage at a known mean, effect sizes against
their population values and closed forms (verdicts and the record: tests/test_prereg.py)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import stats

seeds = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------ intervals
def test_bootstrap_ci_covers_true_mean_at_nominal_rate():
    rng = np.random.default_rng(0)
    hits = [lo <= 1.5 <= hi for r in range(200) for _, lo, hi in [stats.bootstrap_ci(rng.normal(1.5, 2.0, 20), n_resamples=1000, seed=r)]]
    assert 0.88 <= np.mean(hits) <= 0.99


def test_difference_ci_of_separated_samples_has_the_sign_and_covers_the_difference():
    rng = np.random.default_rng(1)
    cis = np.array([stats.difference_ci(rng.normal(3.0, 1, 20), rng.normal(0, 2, 25), n_resamples=1000, seed=r) for r in range(200)])
    assert (cis[:, 1] > 0).all()
    assert 0.88 <= np.mean((cis[:, 1] <= 3.0) & (3.0 <= cis[:, 2])) <= 0.99


@given(seed=seeds, shift=st.floats(-100.0, 100.0))
def test_difference_ci_moves_with_a_shift_of_either_sample(seed, shift):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.0, 1.0, 12), rng.normal(0.0, 1.0, 9)
    d, lo, hi = stats.difference_ci(a, b, n_resamples=500)
    assert stats.difference_ci(a + shift, b, n_resamples=500) == pytest.approx((d + shift, lo + shift, hi + shift), abs=1e-9)
    assert stats.difference_ci(a, b + shift, n_resamples=500) == pytest.approx((d - shift, lo - shift, hi - shift), abs=1e-9)


@given(seed=seeds)
def test_paired_ci_is_narrower_for_correlated_pairs(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 5.0, 16)  # shared per-seed variation that pairing cancels
    a, b = base + 0.5 + rng.normal(0, 0.1, 16), base + rng.normal(0, 0.1, 16)
    dp, plo, phi = stats.difference_ci(a, b, paired=True)
    d, ulo, uhi = stats.difference_ci(a, b)
    assert phi - plo < (uhi - ulo) / 5
    assert dp == pytest.approx(d)  # pairing changes the interval, not the estimate


def test_nans_are_dropped_per_sample_or_per_pair():
    a, b = np.array([1.0, np.nan, 3.0, 4.0, 2.0]), np.array([0.5, 1.0, np.nan, 2.0, 0.0])
    assert stats.difference_ci(a, b) == stats.difference_ci(a[~np.isnan(a)], b[~np.isnan(b)])
    keep = ~np.isnan(a) & ~np.isnan(b)
    assert stats.difference_ci(a, b, paired=True) == stats.difference_ci(a[keep], b[keep], paired=True)


@pytest.mark.parametrize(
    "a, b, paired, expected",
    [
        ([1.0], [0.0, 2.0, 4.0], False, (-1.0, -1.0, -1.0)),  # one value in a sample
        ([2.0, 2.0, 2.0], [1.0, 1.0], False, (1.0, 1.0, 1.0)),  # both constant
        ([1.0, 2.0, 5.0], [0.0, 1.0, 4.0], True, (1.0, 1.0, 1.0)),  # constant paired difference
        ([1.0, np.nan], [np.nan, 3.0], True, None),  # no complete pair
        ([], [1.0, 2.0], False, None),
    ],
)
def test_difference_ci_of_degenerate_samples_is_a_point_or_nan(a, b, paired, expected):
    got = stats.difference_ci(a, b, paired=paired)
    if expected is None:
        assert np.isnan(got).all()
    else:
        assert got == pytest.approx(expected)


def test_paired_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="equal length.*paired=False"):
        stats.difference_ci([1.0, 2.0, 3.0], [1.0, 2.0], paired=True)


# ------------------------------------------------------------------ Hedges' g
def test_hedges_g_closed_form_with_small_sample_correction():
    # mean difference -1, pooled SD 1 (dof 4), J = 1 - 3 / (4 * 6 - 9) = 0.8
    assert stats.hedges_g_ci([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])[0] == pytest.approx(-0.8)


@given(seed=seeds)
def test_hedges_g_matches_population_effect_on_large_samples(seed):
    rng = np.random.default_rng(seed)
    g, lo, hi = stats.hedges_g_ci(rng.normal(1.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000), confidence=0.999, n_resamples=300)
    assert g == pytest.approx(1.0, abs=0.15)
    assert lo < g < hi


@given(seed=seeds, n=st.integers(2, 30), m=st.integers(2, 30), shift=st.floats(-3, 3))
def test_hedges_g_is_antisymmetric(seed, n, m, shift):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(shift, 1.0, n), rng.normal(0.0, 2.0, m)
    assert stats.hedges_g_ci(a, b, n_resamples=200)[0] == -stats.hedges_g_ci(b, a, n_resamples=200)[0]


def test_hedges_g_with_zero_pooled_sd():
    assert stats.hedges_g_ci([1.0, 1.0, 1.0], [0.0, 0.0]) == (np.inf, np.inf, np.inf)
    assert stats.hedges_g_ci([0.0, 0.0], [1.0, 1.0, 1.0]) == (-np.inf, -np.inf, -np.inf)
    assert np.isnan(stats.hedges_g_ci([2.0, 2.0], [2.0, 2.0, 2.0])).all()


def test_hedges_g_with_a_single_value_is_a_point():
    g, lo, hi = stats.hedges_g_ci([3.0], [0.0, 1.0, 2.0, np.nan])  # pooled SD from b alone
    assert np.isfinite(g) and g > 0 and lo == g == hi
    assert np.isnan(stats.hedges_g_ci([1.0], [0.0])).all()  # no degrees of freedom


def test_hedges_g_ci_with_zero_sd_resamples_is_unbounded_not_nan():
    # Each 2-value sample resamples to a constant half the time, so 1 in 4 resampled g is -inf.
    g, lo, hi = stats.hedges_g_ci([0.0, 1.0], [5.0, 6.0])
    assert np.isfinite(g) and g < 0
    assert lo == -np.inf and -np.inf < hi < 0
    assert hi < 0  # the CI excludes 0 from below despite the infinite end


def test_summarize_excludes_and_counts_non_finite_members():
    import pandas as pd

    df = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 2, "m": [0.0, 1.0, 1.0, 0.5, 0.2, 0.4], "nonfinite": [False, False, True, True, False, False]})
    s = stats.summarize(df, ["g"], ["m"]).set_index("g")
    assert s.loc["a", "n"] == 2 and s.loc["a", "nonfinite"] == 2 and s.loc["a", "m"] == 0.5  # 1.0 and 0.5 excluded
    assert s.loc["b", "n"] == 2 and s.loc["b", "nonfinite"] == 0 and s.loc["b", "m"] == pytest.approx(0.3)
