"""The compression meter (`toymesa.meter.compress`): a planted sparse teacher's support recovered
exactly, the code length by hand, nested quantisers (more bits never worse), δ = 0 returning the
uncompressed code, the vmapped grid equal to point-by-point compression, and bad input rejected
with a message that says what to change. Propositions: `theory/meter_norm_compress.md`."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa.meter import compress as C

D, S = 64, 6  # planted teacher: S nonzeros among D


@pytest.fixture(scope="module")
def teacher():
    """(true w, its support, least-squares student w_hat, held-out metric_fn): y = w·x + noise."""
    rng = np.random.default_rng(0)
    w = np.zeros(D)
    support = np.sort(rng.choice(D, S, replace=False))
    w[support] = rng.choice([-1, 1], S) * rng.uniform(1, 2, S)
    X = rng.normal(size=(512, D))
    w_hat = np.linalg.lstsq(X, X @ w + 0.01 * rng.normal(size=512), rcond=None)[0]
    Xt = jnp.asarray(rng.normal(size=(1000, D)), jnp.float32)
    yt = Xt @ jnp.asarray(w, jnp.float32)

    def metric_fn(v):  # relative MSE on held-out x
        return {"rel_mse": jnp.mean((Xt @ v - yt) ** 2) / jnp.mean(yt**2)}

    return w, support, jnp.asarray(w_hat, jnp.float32), metric_fn


FINE = list(itertools.product([k / D for k in range(1, D + 1)], range(1, 13)))  # every support size x 1..12 bits


def test_min_bits_recovers_the_planted_support(teacher):
    w, support, w_hat, metric_fn = teacher
    r = C.min_bits(metric_fn, w_hat, FINE[::-1], delta=1e-3)  # the cheapest point, not the first that passes
    assert r.compressed and r.kept == S
    assert np.flatnonzero(np.asarray(r.params)).tolist() == support.tolist()
    assert r.code_bits == pytest.approx(C.code_bits([D], [S], r.bits))
    assert len(r.table) == len(FINE) and r.table["ok"].sum() > 0
    assert r.code_bits == r.table.loc[r.table["ok"], "code_bits"].min()
    assert not r.table.loc[r.table["kept"] < S, "ok"].any()  # dropping a true weight breaks δ at any bit width
    direct, bits = C.prune_quantize(w_hat, r.keep_fraction, r.bits)
    assert bits == r.code_bits and jnp.array_equal(direct, r.params)


def test_grid_table_equals_point_by_point_compression(teacher):
    _, _, w_hat, metric_fn = teacher
    grid = [(0.1, 3), (0.5, 8), (1.0, 2), (0.25, 1)]
    r = C.min_bits(metric_fn, w_hat, grid, delta=0.5, batch_size=3)  # lax.map path, batches of 3
    for row, (f, b) in zip(r.table.itertuples(), grid, strict=True):
        p, bits = C.prune_quantize(w_hat, f, b)
        assert row.code_bits == pytest.approx(bits) and row.kept == math.ceil(f * D)
        assert row.rel_mse == pytest.approx(float(metric_fn(p)["rel_mse"]), rel=1e-5, abs=1e-7)


def test_delta_zero_gives_the_uncompressed_code(teacher):
    _, _, w_hat, metric_fn = teacher
    r = C.min_bits(metric_fn, w_hat, FINE, delta=0.0)
    assert not r.compressed and r.code_bits == r.uncompressed_bits == 32 * D and r.kept == D
    assert r.params is w_hat and (r.keep_fraction, r.bits) == (1.0, 32)


@given(st.integers(0, 2**31 - 1), st.sampled_from([0.05, 0.3, 0.7, 1.0]))
def test_more_bits_never_increase_any_weights_error(seed, keep):
    """The quantisers are nested (Δ_b = M/2^(b-1)), so each kept weight's error is non-increasing
    in b on a fixed support; hence so is the population MSE of a linear model with isotropic x."""
    rng = np.random.default_rng(seed)
    params = {"a": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "b": jnp.asarray(rng.standard_t(2, size=17), jnp.float32)}
    previous, support = None, None
    for b in range(1, 17):
        p, _ = C.prune_quantize(params, keep, b)
        err = np.concatenate([np.abs(np.asarray(p[k]) - np.asarray(params[k])).ravel() for k in "ab"])
        nz = np.concatenate([np.asarray(p[k]).ravel() != 0 for k in "ab"])
        if previous is not None:
            assert (nz == support).all()
            assert (err <= previous + 1e-6).all()
        previous, support = err, nz


def test_pruning_is_per_tensor_and_keeps_the_largest():
    rng = np.random.default_rng(1)
    params = {"big": jnp.asarray(100 * rng.normal(size=(10, 10)), jnp.float32), "small": jnp.asarray(0.01 * rng.normal(size=40), jnp.float32)}
    p, bits = C.prune_quantize(params, 0.1, 4)
    for name, n in (("big", 100), ("small", 40)):
        w, q = np.abs(np.asarray(params[name])).ravel(), np.asarray(p[name]).ravel()
        k = math.ceil(0.1 * n)
        assert set(np.flatnonzero(q)) == set(np.argsort(-w)[:k])  # each tensor its own top 10%
    assert bits == pytest.approx(10 * 4 + math.log2(math.comb(100, 10)) + 32 + 4 * 4 + math.log2(math.comb(40, 4)) + 32)
    full, full_bits = C.prune_quantize(params, 1.0, 24)
    assert full_bits == pytest.approx(140 * 24 + 2 * 32)
    assert all(np.allclose(np.asarray(full[k]), np.asarray(params[k]), rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(params[k])))) for k in params)


def test_quantiser_levels():
    """b bits: the 2^b levels ±Δ..±M; the largest weight exact, a kept zero coded as +Δ."""
    w = jnp.asarray([4.0, -1.1, 0.0, 2.9], jnp.float32)
    p, _ = C.prune_quantize(w, 1.0, 3)  # Δ = 4 / 4 = 1: levels ±1, ±2, ±3, ±4
    assert np.asarray(p).tolist() == [4.0, -1.0, 1.0, 3.0]
    p, _ = C.prune_quantize(w, 1.0, 1)  # one bit: the sign, magnitude M
    assert np.asarray(p).tolist() == [4.0, -4.0, 4.0, 4.0]


@pytest.mark.parametrize(
    "keep, bits, match",
    [
        (0.0, 8, "keep_fraction must be a number in \\(0, 1\\].*use e.g."),
        (1.5, 8, "keep_fraction"),
        (-0.2, 8, "keep_fraction"),
        (True, 8, "keep_fraction"),
        ("0.5", 8, "keep_fraction"),
        (0.5, 0, "bits must be an integer from 1 to 32.*use e.g. 8"),
        (0.5, -3, "bits"),
        (0.5, 2.5, "bits"),
        (0.5, 33, "bits"),
        (0.5, True, "bits"),
    ],
)
def test_bad_points_raise_saying_what_to_change(keep, bits, match):
    with pytest.raises(ValueError, match=match):
        C.prune_quantize(jnp.ones(4), keep, bits)
    with pytest.raises(ValueError, match=match):
        C.min_bits(lambda p: {"m": jnp.sum(p)}, jnp.ones(4), [(0.5, 4), (keep, bits)], 0.1)


def test_bad_grid_and_delta_raise(teacher):
    _, _, w_hat, metric_fn = teacher
    with pytest.raises(ValueError, match="grid is empty"):
        C.min_bits(metric_fn, w_hat, [], 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        C.min_bits(metric_fn, w_hat, [(0.5, 4)], -0.1)
    with pytest.raises(ValueError, match="one for every metric"):
        C.min_bits(metric_fn, w_hat, [(0.5, 4)], {"other": 0.1})
    with pytest.raises(ValueError, match="unknown metric"):
        C.behaviour_metrics(None, 0, names=("triggered_defection", "loss"))


def test_per_metric_delta_and_nan_metrics(teacher):
    """A metric undefined (NaN) for the model and every compression never blocks a point."""
    _, _, w_hat, metric_fn = teacher

    def fn(v):
        return {**metric_fn(v), "undefined": jnp.float32(jnp.nan)}

    r = C.min_bits(fn, w_hat, [(S / D, 10), (1.0, 10)], {"rel_mse": 1e-3, "undefined": 0.0})
    assert r.compressed and r.kept == S and math.isnan(r.reference["undefined"])


@pytest.mark.slow  # compiles the decoding program vmapped over the grid
def test_behaviour_metrics_on_a_transformer(tiny_cfg, tiny_params):
    fn = C.behaviour_metrics(tiny_cfg, seed=0, n_per_class=8)
    grid = [(0.5, 4), (1.0, 16)]
    r = C.min_bits(fn, tiny_params, grid, delta=0.0)
    assert set(r.reference) == set(C.BEHAVIOUR)
    for row, (f, b) in zip(r.table.itertuples(), grid, strict=True):
        direct = fn(C.prune_quantize(tiny_params, f, b)[0])
        assert all(getattr(row, name) == pytest.approx(float(direct[name]), nan_ok=True) for name in C.BEHAVIOUR)
    assert r.table.loc[1, "kept"] == sum(x.size for x in jax.tree.leaves(tiny_params))
