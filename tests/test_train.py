"""Training: populations equal individual runs, determinism, chunking, the masked loss, PRNG roles.

All populations have N=3 members and the tiny config's 6 steps, so `init_population` and
`population_chunk` compile once (plus once for chunk=3) and every example reuses them.
"""

import functools
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toymesa import model, train
from toymesa.config import HParams
from toymesa.model import Intervention
from toymesa.tasks import layout, sample_batch

SEEDS = np.array([0, 5, 11], np.int32)
HP = HParams(
    lr=np.array([1e-3, 3e-3, 1e-2], np.float32),
    weight_decay=np.array([0.0, 0.01, 0.1], np.float32),
    trigger_rate=np.array([0.2, 0.5, 0.9], np.float32),
    safety_lr=np.array([3e-4, 3e-4, 3e-4], np.float32),
)
N = len(SEEDS)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_equal(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def pop(tiny_cfg):
    """The reference population: 3 members with different seeds, lr, weight decay and trigger rate."""
    return train.population(tiny_cfg, SEEDS, HP, chunk=tiny_cfg.train.steps)


# ------------------------------------------------------------------ populations
def test_population_equals_individual_runs(tiny_cfg, pop):
    states, hist = pop
    steps = tiny_cfg.train.steps
    assert hist["loss"].shape == (N, steps)
    np.testing.assert_array_equal(states.step, steps)
    run = jax.jit(train.run, static_argnums=(0, 3))  # one compile for all members; seed and hparams traced
    for i in range(N):
        state_i, hist_i = run(tiny_cfg, SEEDS[i], HParams(*(v[i] for v in HP)), steps)
        # vmap changes reduction order: rtol 1e-4, atol 1e-5
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(hist[key][i], hist_i[key], rtol=1e-4, atol=1e-5, err_msg=key)
        for path, x, y in zip(paths(states.params), leaves(states.params), leaves(state_i.params), strict=True):
            x = x[i]
            if "qkv" in path and "bias" in path:
                # The key bias shifts every score of a query equally, so softmax removes it: its
                # true gradient is 0 and Adam normalises float noise into steps of size ~lr. That
                # slice agrees only to Adam's bound (sum of lr over the steps); q and v biases tightly.
                q, k, v = x.reshape(3, -1)
                q_, k_, v_ = y.reshape(3, -1)
                np.testing.assert_allclose(k, k_, atol=float(HP.lr[i]) * steps)
                x, y = np.concatenate([q, v]), np.concatenate([q_, v_])
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=path)


def test_members_differ(pop):
    states, hist = pop
    assert len({tuple(h) for h in hist["loss"]}) == N
    w = leaves(states.params)[0]
    assert not np.array_equal(w[0], w[1])


def test_chunks_compose_exactly(tiny_cfg, pop):
    states6, hist6 = pop
    states3, hist3 = train.population(tiny_cfg, SEEDS, HP, chunk=3)
    for key in hist6:
        np.testing.assert_array_equal(hist3[key], hist6[key], err_msg=key)  # documented as exact
    assert_trees_equal(states3.params, states6.params)


@given(pair=st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=2, unique=True))
def test_same_seed_identical_different_seed_different(tiny_cfg, pair):
    s1, s2 = pair
    seeds = np.array([s1, s2, s1], np.int32)
    hp = train.stack_hparams(tiny_cfg, N)
    states_a, hist_a = train.population(tiny_cfg, seeds, hp)
    states_b, hist_b = train.population(tiny_cfg, seeds, hp)
    for key in hist_a:
        np.testing.assert_array_equal(hist_a[key], hist_b[key], err_msg=key)  # rerun: bit-identical
        np.testing.assert_array_equal(hist_a[key][0], hist_a[key][2], err_msg=key)  # same seed in one population
    assert_trees_equal(states_a.params, states_b.params)
    assert not np.array_equal(hist_a["loss"][0], hist_a["loss"][1])


def test_zero_learning_rate_leaves_params_unchanged(tiny_cfg, pop):
    init = train.init_population(tiny_cfg, SEEDS)
    init_params = leaves(init.params)  # copy now: population donates its own init states
    states, hist = train.population(tiny_cfg, SEEDS, HP._replace(lr=np.zeros(N, np.float32)))
    for x, y in zip(init_params, leaves(states.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (hist["grad_norm"] > 0).all()  # there were gradients; they were not applied
    trained = leaves(pop[0].params)
    assert any(not np.array_equal(x, y) for x, y in zip(init_params, trained, strict=True))  # lr > 0 does move them


# ------------------------------------------------------------------ the masked loss
@pytest.fixture(scope="module")
def batch(tiny_cfg):
    return jax.jit(lambda k: sample_batch(tiny_cfg.task, k, 0.5, tiny_cfg.train.batch_size))(jax.random.key(4))


SITE = "ln_final.hook_normalized"


@functools.cache
def loss_with_add(cfg):
    """jit: (value, grad) of train.masked_loss w.r.t. an additive intervention at SITE.

    masked_loss takes no interventions, so model.apply is wrapped while masked_loss is traced.
    """
    original = model.apply

    def f(params, batch, add):
        def loss(add):
            def apply(cfg_, params_, tokens, interventions=None):
                assert interventions is None
                return original(cfg_, params_, tokens, {SITE: Intervention(add=add)})

            with mock.patch.object(model, "apply", apply):
                return train.masked_loss(cfg, params, batch)[0]

        return jax.value_and_grad(loss)(add)

    return jax.jit(f)


def target_positions(cfg):
    """Positions t whose prediction (of token t+1) is a training target."""
    lay, T = layout(cfg.task), cfg.task.seq_len
    t = np.arange(T)
    return (t >= lay.prompt_len - 1) & (t < lay.length - 1)


def test_loss_gradient_only_at_target_predictions(tiny_cfg, tiny_params, batch):
    B, T, D = tiny_cfg.train.batch_size, tiny_cfg.task.seq_len, tiny_cfg.model.d_model
    _, g = loss_with_add(tiny_cfg)(tiny_params, batch, jnp.zeros((B, T, D)))
    norm = np.linalg.norm(np.asarray(g), axis=-1)  # [B, T]
    targets = target_positions(tiny_cfg)
    assert (norm[:, ~targets] == 0).all()  # exactly zero before prompt_len - 1 and from length - 1 on
    assert (norm[:, targets] > 0).all()


@given(seed=st.integers(0, 2**30), scale=st.floats(0.1, 100.0))
def test_loss_ignores_predictions_of_prompt_tokens(tiny_cfg, tiny_params, batch, seed, scale):
    """Arbitrary logits wherever the next token is not a target (prompt tokens, PAD) leave the loss bit-identical."""
    B, T, D = tiny_cfg.train.batch_size, tiny_cfg.task.seq_len, tiny_cfg.model.d_model
    f = loss_with_add(tiny_cfg)
    base, _ = f(tiny_params, batch, jnp.zeros((B, T, D)))
    noise = scale * jax.random.normal(jax.random.key(seed), (B, T, D))
    off = jnp.asarray(~target_positions(tiny_cfg))[None, :, None]
    perturbed, _ = f(tiny_params, batch, jnp.where(off, noise, 0.0))
    assert float(perturbed) == float(base)
    changed, _ = f(tiny_params, batch, jnp.where(off, 0.0, noise))
    assert float(changed) != float(base)  # while the target predictions do count


def hand_ce(cfg, params, tokens):
    """Per-position cross-entropy float64[B, T-1] of predicting tokens[:, 1:], in NumPy."""
    logits, _ = model.apply(cfg, params, tokens)
    z = np.asarray(logits, np.float64)[:, :-1]
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nxt = np.asarray(tokens)[:, 1:]
    return -np.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0], np.asarray(logits)


def test_masked_loss_matches_hand_computation(tiny_cfg, tiny_params, batch):
    ce, logits = hand_ce(tiny_cfg, tiny_params, batch.tokens)
    m = np.asarray(batch.loss_mask)[:, 1:]
    loss, aux = train.masked_loss(tiny_cfg, tiny_params, batch)
    np.testing.assert_allclose(float(loss), (ce * m).sum() / m.sum(), rtol=1e-5)  # float32 vs float64
    ans = layout(tiny_cfg.task).answer
    acc = (logits[:, ans - 1].argmax(-1) == np.asarray(batch.tokens)[:, ans]).mean()
    np.testing.assert_allclose(float(aux["answer_acc"]), acc, atol=1e-6)
    # an explicit mask is honoured: the answer token only
    loss_ans, _ = train.masked_loss(tiny_cfg, tiny_params, batch, mask=batch.answer_mask)
    np.testing.assert_allclose(float(loss_ans), ce[:, ans - 1].mean(), rtol=1e-5)
    # and the default is the batch's loss mask
    np.testing.assert_array_equal(float(train.masked_loss(tiny_cfg, tiny_params, batch, mask=batch.loss_mask)[0]), float(loss))


def test_token_losses_shape(tiny_cfg, tiny_params, batch):
    ce, logits = train.token_losses(tiny_cfg, tiny_params, batch.tokens)
    B, T = batch.tokens.shape
    assert ce.shape == (B, T - 1) and logits.shape[:2] == (B, T)


# ------------------------------------------------------------------ PRNG roles
@given(pair=st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=2, unique=True))
def test_role_keys_differ_across_roles_and_seeds(pair):
    keys = {(s, r): tuple(np.asarray(jax.random.key_data(train.role_key(s, r))).tolist()) for s in pair for r in train.ROLES}
    assert len(set(keys.values())) == len(keys)
    again = tuple(np.asarray(jax.random.key_data(train.role_key(pair[0], "data"))).tolist())
    assert again == keys[(pair[0], "data")]


# ------------------------------------------------------------------ warnings
def test_train_step_traces_without_deprecation_warnings(tiny_cfg):
    state = jax.eval_shape(lambda: train.init(tiny_cfg, 0))
    b = jax.eval_shape(lambda k: sample_batch(tiny_cfg.task, k, 0.5, 2), jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        jax.eval_shape(functools.partial(train.train_step, tiny_cfg), state, b, tiny_cfg.hparams)


@pytest.mark.parametrize("where", ["loss", "grad", "param"])
def test_step_metrics_flag_any_non_finite_value(tiny_params, where):
    grads = jax.tree.map(jnp.zeros_like, tiny_params)
    params = tiny_params
    loss = jnp.float32(jnp.nan) if where == "loss" else jnp.float32(1.0)
    if where == "grad":
        grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), grads)
    if where == "param":  # one element of one leaf is enough
        leaves, treedef = jax.tree.flatten(params)
        leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(-jnp.inf)
        params = jax.tree.unflatten(treedef, leaves)
    assert not bool(train.step_metrics(loss, grads, params)["finite"])
    assert bool(train.step_metrics(jnp.float32(1.0), jax.tree.map(jnp.zeros_like, tiny_params), tiny_params)["finite"])
