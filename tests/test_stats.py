"""Statistics checked against known answers: CI coverage at a known mean, effect sizes against
their population values and closed forms, the verdict's branches and its mirror symmetry, and
the preregistration record's append-only history."""

import json

import numpy as np
import pytest
from hypothesis import assume, given
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
    assert stats.verdict(lo, hi, below=0.0) == "confirmed"


# ------------------------------------------------------------------ verdict
@pytest.mark.parametrize(
    "low, high, side, expected",
    [
        (0.1, 2.0, "above", "confirmed"),
        (-2.0, -0.1, "above", "refuted"),
        (-1.0, 0.0, "above", "refuted"),  # nothing in the CI exceeds the threshold
        (-1.0, 1.0, "above", "inconclusive"),
        (0.0, 1.0, "above", "inconclusive"),
        (-2.0, -0.1, "below", "confirmed"),
        (0.1, 2.0, "below", "refuted"),
        (-1.0, 1.0, "below", "inconclusive"),
        (np.nan, 1.0, "above", "inconclusive"),
        (1.0, np.nan, "below", "inconclusive"),
    ],
)
def test_verdict_branches(low, high, side, expected):
    assert stats.verdict(low, high, **{side: 0.0}) == expected


@given(low=st.floats(-10, 10), width=st.floats(0, 10), t=st.floats(-10, 10))
def test_verdict_mirrors_under_negation(low, width, t):
    high = low + width
    assert stats.verdict(low, high, above=t) == stats.verdict(-high, -low, below=-t)


@pytest.mark.parametrize("kwargs", [{}, {"above": 0.0, "below": 1.0}])
def test_verdict_needs_exactly_one_threshold(kwargs):
    with pytest.raises(ValueError, match=r"exactly one threshold.*above=t"):
        stats.verdict(0.0, 1.0, **kwargs)


# ------------------------------------------------------------------ preregistration
H1 = {"id": "h1", "statement": "Loss falls with depth.", "prediction": "loss_gap > 0", "metric": "loss"}
H2 = {"id": "h2", "statement": "Accuracy saturates.", "prediction": "acc > 0.9"}
EDITED = H1 | {"prediction": "loss_gap > 0.1"}


def _file(path):
    return json.loads(path.read_text())


@given(text=st.text(max_size=20), other=st.text(max_size=20))
def test_digest_changes_with_any_text_edit(text, other):
    assume(text != other)
    assert stats.hypothesis_digest(H1 | {"prediction": text}) != stats.hypothesis_digest(H1 | {"prediction": other})


def test_digest_ignores_key_order_and_unknown_keys_but_not_missing_ones():
    d = stats.hypothesis_digest(H1)
    assert len(d) == 12 and int(d, 16) >= 0
    assert stats.hypothesis_digest(dict(reversed(H1.items())) | {"notes": "x"}) == d
    assert stats.hypothesis_digest({k: v for k, v in H1.items() if k != "metric"}) != d
    assert stats.hypothesis_digest(H1 | {"statement": H1["statement"] + " "}) != d


def test_reregistering_unchanged_hypotheses_amends_nothing(tmp_path):
    path = tmp_path / "prereg.json"
    first = stats.register(path, [H1, H2], results_exist=False, now="t0")
    again = stats.register(path, [H2, H1], results_exist=True, now="t1")
    assert again == first == _file(path) and first["amendments"] == []
    assert stats.registration_status(again) == {"h1": "as registered", "h2": "as registered"}
    assert [p.name for p in tmp_path.iterdir()] == ["prereg.json"]  # no temp file left behind


def test_edit_before_results_is_an_amendment(tmp_path):
    path = tmp_path / "prereg.json"
    stats.register(path, [H1, H2], results_exist=False, now="t0")
    rec = stats.register(path, [EDITED, H2], results_exist=False, now="t1")
    (a,) = rec["amendments"]
    assert (a["id"], a["kind"], a["at"], a["results_existed"]) == ("h1", "edited", "t1", False)
    assert a["old"]["prediction"] == H1["prediction"] and a["new"]["digest"] == stats.hypothesis_digest(EDITED)
    assert stats.registration_status(rec) == {"h1": "amended before results", "h2": "as registered"}


def test_edit_after_results_is_flagged_and_original_is_kept(tmp_path):
    path = tmp_path / "prereg.json"
    stats.register(path, [H1, H2], results_exist=False, now="t0")
    stats.register(path, [EDITED, H2], results_exist=True, now="t1")
    rec = stats.register(path, [EDITED | {"prediction": "loss_gap > 0.2"}, H2], results_exist=False, now="t2")
    assert stats.registration_status(rec)["h1"] == "EDITED AFTER RESULTS"
    assert stats.original(rec, "h1") == H1 | {"digest": stats.hypothesis_digest(H1)}
    with pytest.raises(KeyError, match="h9"):
        stats.original(rec, "h9")


def test_history_is_append_only_and_valid_json_after_every_call(tmp_path):
    path = tmp_path / "prereg.json"
    H3 = {"id": "h3", "statement": "Width helps.", "prediction": "acc_gap > 0"}
    calls = [([H1, H2], False), ([EDITED, H2], False), ([EDITED, H2, H3], False), ([EDITED, H3], True), ([H1, H3], True), ([H1, H3], True)]
    before = None
    for t, (hs, results) in enumerate(calls):
        stats.register(path, hs, results_exist=results, now=f"t{t}")
        now = _file(path)  # parses: the file is whole JSON after each call
        if before is not None:
            assert {k: v for k, v in now.items() if k != "amendments"} == {k: v for k, v in before.items() if k != "amendments"}
            assert now["amendments"][: len(before["amendments"])] == before["amendments"]
        before = now
    assert [(a["id"], a["kind"]) for a in before["amendments"]] == [("h1", "edited"), ("h3", "added"), ("h2", "removed"), ("h1", "edited")]
    assert stats.registration_status(before) == {"h1": "EDITED AFTER RESULTS", "h2": "REMOVED AFTER RESULTS", "h3": "amended before results"}
    assert stats.original(before, "h3") == H3 | {"digest": stats.hypothesis_digest(H3)}


def test_added_and_removed_hypotheses_are_flagged(tmp_path):
    H3 = {"id": "h3", "statement": "Width helps.", "prediction": "acc_gap > 0"}
    stats.register(tmp_path / "a.json", [H1, H2], results_exist=False)
    rec = stats.register(tmp_path / "a.json", [H1, H3], results_exist=True)
    assert stats.registration_status(rec) == {"h1": "as registered", "h2": "REMOVED AFTER RESULTS", "h3": "ADDED AFTER RESULTS"}
    stats.register(tmp_path / "b.json", [H1, H2], results_exist=False)
    rec = stats.register(tmp_path / "b.json", [H1], results_exist=False)
    assert stats.registration_status(rec)["h2"] == "removed before results"
    rec = stats.register(tmp_path / "b.json", [H1, H2], results_exist=True)  # back again, now with results in hand
    assert stats.registration_status(rec)["h2"] == "EDITED AFTER RESULTS"


def test_registering_after_results_is_flagged_and_ids_must_be_unique(tmp_path):
    rec = stats.register(tmp_path / "late.json", [H1], results_exist=True)
    assert stats.registration_status(rec) == {"h1": "REGISTERED AFTER RESULTS"}
    with pytest.raises(ValueError, match="unique.*h1"):
        stats.register(tmp_path / "dup.json", [H1, EDITED], results_exist=False)
