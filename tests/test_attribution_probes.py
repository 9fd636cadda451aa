"""Linear probes (toymesa.attribution.probes): AUROC exact, probes on planted data, the null band.

Planted data: unit Gaussian noise in D dimensions plus a class-dependent offset along one unit
direction u. AUROC is checked against hand counts and a brute-force pair count; diff-of-means
and logistic probes must reach AUROC 1 on held-out separable data; random directions must land
in their own null band, centred at 0.5, whose quantiles match the closed form
AUROC(r) = Phi(delta (r.u) / sqrt 2) for a Gaussian shift delta; a probe fitted on labels that
carry no information must score inside that band. Model-level functions (activations, the
contrast pair, vmap over stacked parameters) run on the tiny config of conftest.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import stats as sps

from toymesa import model
from toymesa.attribution import probes
from toymesa.tasks import vocab

N_AUC = 24  # examples per hypothesis-drawn AUROC case (fixed: one compile)
_auroc = jax.jit(probes.auroc)
_null = jax.jit(probes.random_null, static_argnums=3)


def _brute(scores, labels):
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    p, n = s[y][:, None], s[~y][None, :]
    return ((p > n).sum() + 0.5 * (p == n).sum()) / (y.sum() * (~y).sum())


# ------------------------------------------------------------------ AUROC
def test_auroc_hand_cases():
    y = jnp.array([False, False, True, True])
    assert float(_auroc(jnp.array([0.0, 1.0, 2.0, 3.0]), y)) == 1.0  # every positive above
    assert float(_auroc(jnp.array([3.0, 2.0, 1.0, 0.0]), y)) == 0.0  # reversed
    assert float(_auroc(jnp.zeros(4), y)) == 0.5  # all tied
    # positives {2, 3}, negatives {1, 2}: 2>1, 2=2 (1/2), 3>1, 3>2 -> 3.5 / 4
    assert float(_auroc(jnp.array([1.0, 2.0, 2.0, 3.0]), jnp.array([False, True, False, True]))) == 0.875
    assert np.isnan(float(_auroc(jnp.arange(4.0), jnp.ones(4, bool))))  # one class only


@given(st.lists(st.integers(-3, 3), min_size=N_AUC, max_size=N_AUC), st.lists(st.booleans(), min_size=N_AUC, max_size=N_AUC))
def test_auroc_equals_brute_force_pair_count(values, labels):
    assume(0 < sum(labels) < N_AUC)
    s = np.asarray(values, np.float32) * 0.5  # few distinct values: many ties
    y = np.asarray(labels)
    got = float(_auroc(jnp.asarray(s), jnp.asarray(y)))
    assert got == pytest.approx(_brute(s, y), abs=1e-6)
    # reversing the scores swaps every strict pair and keeps the ties: 1 - AUROC, exactly
    assert float(_auroc(jnp.asarray(-s), jnp.asarray(y))) == pytest.approx(1 - got, abs=1e-6)
    # a strictly increasing map changes no comparison
    assert float(_auroc(jnp.asarray(np.exp(s) + 3 * s), jnp.asarray(y))) == pytest.approx(got, abs=1e-6)


# ------------------------------------------------------------------ planted data
D = 16


def _direction(seed):
    u = jax.random.normal(jax.random.key(seed), (D,))
    return u / jnp.linalg.norm(u)


def _planted(key, n, u, delta=3.0, separable=False):
    """acts float32[n, D], labels bool[n] (first half positive): Gaussian noise plus
    +-delta/2 along the unit direction u; `separable`: the u-coordinate is replaced by
    sign * (1 + U(0, 1)), a margin of 2."""
    k_x, k_m = jax.random.split(key)
    y = jnp.arange(n) < n // 2
    sign = jnp.where(y, 1.0, -1.0)[:, None]
    x = jax.random.normal(k_x, (n, D))
    if separable:
        along = sign * (1 + jax.random.uniform(k_m, (n, 1)))
        return x - (x @ u)[:, None] * u[None] + along * u[None], y
    return x + sign * (delta / 2) * u[None], y


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _split_planted(seed, n=400, delta=3.0, separable=False):
    """Fit and test sets drawn independently along the same planted direction u."""
    u = _direction(seed)
    k = jax.random.key(seed + 100)
    x_fit, y_fit = _planted(k, n, u, delta, separable)
    x_test, y_test = _planted(jax.random.fold_in(k, 1), n, u, delta, separable)
    return probes.Split(x_fit, y_fit, x_test, y_test), u


def _logistic_direction(acts, labels):
    return probes.logistic(acts, labels)[0]


FITS = {"diff_of_means": probes.diff_of_means, "logistic": _logistic_direction}
_held_out = jax.jit(probes.held_out_auroc, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _fit_and_score(fit, data):
    return fit(data.train_acts, data.train_labels), probes.held_out_auroc(fit, data)


@pytest.mark.parametrize("method", list(FITS))
def test_probe_reaches_auroc_1_on_held_out_separable_data(method):
    data, u = _split_planted(0, separable=True)
    direction, score = _fit_and_score(FITS[method], data)
    assert float(score) == 1.0
    assert float(direction @ u) / float(jnp.linalg.norm(direction)) > 0.9  # it found u, with its sign


def test_held_out_auroc_fits_on_train_rows_and_scores_test_rows():
    data, _ = _split_planted(1, separable=True)
    flipped = data._replace(test_labels=~data.test_labels)  # the test classes swapped
    assert float(_held_out(probes.diff_of_means, flipped)) == 0.0
    # fitted on the test rows it would have scored 1 there: the swap must show
    swapped = probes.Split(data.test_acts, ~data.test_labels, data.test_acts, ~data.test_labels)
    assert float(_held_out(probes.diff_of_means, swapped)) == 1.0


def test_split_partitions_the_rows():
    acts = jnp.arange(50.0)[:, None] * jnp.ones((1, 3))
    s = jax.jit(probes.split, static_argnums=3)(acts, jnp.arange(50) % 2 == 0, jax.random.key(3), 20)
    train, test = np.asarray(s.train_acts[:, 0]), np.asarray(s.test_acts[:, 0])
    assert len(test) == 20 and len(train) == 30
    assert sorted(np.r_[train, test].tolist()) == list(range(50))  # disjoint and complete
    assert np.array_equal(np.asarray(s.test_labels), test % 2 == 0)  # labels travel with their rows


def test_diff_of_means_hand_case():
    acts = jnp.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    y = jnp.array([True, True, False, False])
    # means (2, 0) and (0, 3): difference (2, -3) / sqrt 13
    np.testing.assert_allclose(np.asarray(probes.diff_of_means(acts, y)), np.array([2.0, -3.0]) / np.sqrt(13), rtol=1e-6)


def test_logistic_is_a_stationary_point_and_deterministic():
    data, _ = _split_planted(0, separable=True)  # a finite optimum all the same: the penalty bounds it
    x, y, l2 = np.asarray(data.train_acts, np.float64), np.asarray(data.train_labels), 0.05
    w, b = probes.logistic(data.train_acts, data.train_labels, l2)
    w2, b2 = probes.logistic(data.train_acts, data.train_labels, l2)
    assert np.array_equal(np.asarray(w), np.asarray(w2)) and float(b) == float(b2)
    # the gradient of J(v, c) (standardised coordinates, see the docstring) vanishes there
    m = x.mean(0)
    s = np.sqrt(((x - m) ** 2).mean())
    xt = np.c_[(x - m) / s, np.ones(len(x))]
    theta = np.r_[np.asarray(w, np.float64) * s, float(b) + m @ np.asarray(w, np.float64)]
    p = 1 / (1 + np.exp(-xt @ theta))
    grad = xt.T @ (p - y) / len(x) + l2 * theta
    assert np.abs(grad).max() < 1e-5
    assert np.abs(theta).max() > 0.1  # and it is not the starting point


# ------------------------------------------------------------------ the null band
def test_random_directions_fall_in_their_null_band_centred_at_half():
    delta = 3.0
    u = _direction(4)
    x, y = _planted(jax.random.key(4), 600, u, delta)
    null, fresh = np.split(np.asarray(_null(x, y, jax.random.key(5), 1600)), 2)  # fresh: other random directions
    lo, hi, mad = (float(v) for v in probes.null_band(jnp.asarray(null)))
    assert abs(np.median(null) - 0.5) < 0.02 and abs((lo + hi) / 2 - 0.5) < 0.02  # centred at chance
    assert 0.93 < np.mean((fresh >= lo) & (fresh <= hi)) < 0.97
    # the closed form: t = r.u has (t + 1) / 2 ~ Beta((D-1)/2, (D-1)/2), AUROC = Phi(delta t / sqrt 2)
    t = 2 * sps.beta((D - 1) / 2, (D - 1) / 2).ppf([0.025, 0.975]) - 1
    np.testing.assert_allclose([lo, hi], sps.norm.cdf(delta * t / np.sqrt(2)), atol=0.03)
    # and the planted direction is far outside it
    assert float(_auroc(x @ u, y)) > hi + 0.05 and mad > 0.1


def test_null_band_of_known_values():
    lo, hi, mad = probes.null_band(jnp.linspace(0.0, 1.0, 101))
    assert float(lo) == pytest.approx(0.025, abs=1e-6) and float(hi) == pytest.approx(0.975, abs=1e-6)
    assert float(mad) == pytest.approx(np.abs(np.linspace(0, 1, 101) - 0.5).mean(), abs=1e-6)


@pytest.mark.slow  # 40 data sets; the null band itself is checked above
def test_diff_of_means_on_noise_labels_lands_in_the_null_band():
    """Labels independent of the activations: the held-out AUROC of the fitted direction is
    chance, inside the random-direction band of the same test set, in ~95% of 40 datasets."""

    def one(key):
        k_fit, k_test, k_yf, k_yt, k_null = jax.random.split(key, 5)
        fit_x, test_x = jax.random.normal(k_fit, (200, D)), jax.random.normal(k_test, (200, D))
        data = probes.Split(fit_x, jax.random.bernoulli(k_yf, 0.5, (200,)), test_x, jax.random.bernoulli(k_yt, 0.5, (200,)))
        lo, hi, _ = probes.null_band(probes.random_null(test_x, data.test_labels, k_null, 120))
        a = probes.held_out_auroc(probes.diff_of_means, data)
        return a, (a >= lo) & (a <= hi)

    a, inside = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), 40))
    assert 0.85 <= float(inside.mean()) <= 1.0
    assert abs(float(a.mean()) - 0.5) < 0.02


# ------------------------------------------------------------------ on a model
SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def prompts(tiny_cfg):
    """int32[8, T]: any token ids will do for these equivalences (no world needed)."""
    return jax.random.randint(jax.random.key(8), (8, tiny_cfg.task.seq_len), 0, vocab(tiny_cfg.task).size)


def test_activations_read_the_cache(tiny_cfg, tiny_params, prompts):
    cache = model.apply(tiny_cfg, tiny_params, prompts)[1]
    assert np.array_equal(np.asarray(probes.activations(tiny_cfg, tiny_params, prompts, SITE, 3)), np.asarray(cache[SITE][:, 3]))
    z = probes.activations(tiny_cfg, tiny_params, prompts, "blocks.0.attn.hook_z", 2)  # [B, H, Dh] flattened
    assert np.array_equal(np.asarray(z), np.asarray(cache["blocks.0.attn.hook_z"][:, 2]).reshape(len(prompts), -1))
    with pytest.raises(ValueError, match="position axis"):
        probes.activations(tiny_cfg, tiny_params, prompts, "blocks.0.attn.hook_pattern", 2)


@given(st.integers(0, 7), st.integers(0, 7), st.integers(1, 9))
def test_contrast_pair_direction_is_the_activation_difference(tiny_cfg, tiny_params, prompts, i, j, position):
    a, b = prompts[i], prompts[j]
    got = probes.contrast_pair_direction(tiny_cfg, tiny_params, SITE, position, a, b)  # eager: the same ops as below
    cache = model.apply(tiny_cfg, tiny_params, jnp.stack([a, b]))[1][SITE]
    assert np.array_equal(np.asarray(got), np.asarray(cache[0, position] - cache[1, position]))
    # the same rows inside the whole batch give the same difference (rows do not interact)
    full = model.apply(tiny_cfg, tiny_params, prompts)[1][SITE]
    np.testing.assert_allclose(np.asarray(got), np.asarray(full[i, position] - full[j, position]), atol=1e-5)
    if i == j:
        assert not np.any(np.asarray(got))


def test_vmap_over_stacked_parameters_equals_per_model_calls(tiny_cfg, tiny_params, prompts):
    # three different models: the fixture's parameters, scaled and shifted (stacked in NumPy: no compiles)
    stacked = jax.tree.map(lambda x: np.stack([np.asarray(x), 1.3 * np.asarray(x), np.asarray(x) + 0.05]), tiny_params)
    labels = jnp.arange(8) < 4
    pos = 4

    def per_model(p):
        acts = probes.activations(tiny_cfg, p, prompts, SITE, pos)
        d = probes.contrast_pair_direction(tiny_cfg, p, SITE, pos, prompts[0], prompts[5])
        return acts, d, _auroc(acts @ d, labels), probes.diff_of_means(acts, labels)

    batched = jax.jit(jax.vmap(per_model))(stacked)
    for m in range(3):
        single = per_model(jax.tree.map(lambda x, m=m: x[m], stacked))  # eager, one model at a time
        for got, want in zip(batched, single, strict=True):
            np.testing.assert_allclose(np.asarray(got[m]), np.asarray(want), rtol=1e-5, atol=1e-6)
