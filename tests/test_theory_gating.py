"""Numerical checks of theory/gating.md: what gradient reaches a path that never fires.

Claims (labelled as in the note) and the tests that check them:

* Prop. 1   an absent token's embedding row gets gradient exactly 0; rows that occur do not:
            `test_absent_token_embedding_gets_exactly_zero_gradient`
* Cor. 2    fresh AdamW moves that row only by decoupled weight decay, factor 1 - lr_t * wd:
            `test_fresh_adamw_moves_absent_row_only_by_weight_decay`
            AdamW with moments from earlier steps keeps moving it (momentum):
            `test_old_adam_moments_keep_moving_absent_row`
            SGD with momentum and coupled decay keeps it on its ray, scaled by a data-free scalar:
            `test_sgd_momentum_with_coupled_decay_keeps_absent_row_on_its_ray`
* Prop. 3   an exactly closed ReLU gate starves its unit; a GELU "gate" only suppresses it:
            `test_relu_gate_starves_unit_gelu_gate_only_suppresses`
* Remark    SGD leaves a linear map's action on a never-seen input direction unchanged; Adam does not:
            `test_adam_updates_directions_the_inputs_never_span`
* (c)       shared weights and the defect token's unembedding get gradient from untriggered data:
            `test_defect_unembedding_and_shared_weights_get_gradient`

The transformer checks use the session's tiny config (one compile of the loss gradient and
one of `train.train_step`); hypothesis draws values (seeds, inputs), never shapes.
"""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from toymesa import model, safety, train
from toymesa.config import Config, HParams, SafetyConfig
from toymesa.tasks import PAD, layout, sample, vocab
from toymesa.tasks.rules import active_triggers

B = 8  # rows per batch in every transformer check
NONE, ALL = np.zeros(B, bool), np.ones(B, bool)  # want_triggered: safety-like and triggered batches


def leaf(tree, *path):
    """One parameter of an nnx.State (or of a pytree of its shape) as a NumPy array."""
    for k in path:
        tree = tree[k]
    return np.asarray(tree.get_value() if isinstance(tree, nnx.Variable) else tree)


def trigger_id(cfg) -> int:
    (t,) = active_triggers(cfg.task)  # the `single` rule has one trigger token
    return int(t)


@functools.partial(jax.jit, static_argnums=0)
def draw(task, seed, want):
    """A batch whose rows fire iff `want` (bool[B])."""
    return sample(task, jax.random.key(seed), want)


@functools.partial(jax.jit, static_argnums=0)
def loss_grads(cfg, params, batch):
    """(masked_loss, d masked_loss / d params, logits [B, T, V], final normalised residual [B, T, D])."""
    loss, grads = jax.value_and_grad(lambda p: train.masked_loss(cfg, p, batch)[0])(params)
    logits, cache = model.apply(cfg, params, batch.tokens)
    return loss, grads, logits, cache["ln_final.hook_normalized"]


# ------------------------------------------------------------------ Proposition 1: the embedding
@given(seed=st.integers(0, 2**31 - 1))
def test_absent_token_embedding_gets_exactly_zero_gradient(tiny_cfg, tiny_params, seed):
    t, V = trigger_id(tiny_cfg), vocab(tiny_cfg.task).size
    batch = draw(tiny_cfg.task, seed, NONE)
    _, g, _, _ = loss_grads(tiny_cfg, tiny_params, batch)
    tokens, gE = np.asarray(batch.tokens), leaf(g, "embed", "embedding")
    assert t not in tokens
    np.testing.assert_array_equal(gE[t], 0.0)  # exact: the scatter-add never writes this row
    dec = vocab(tiny_cfg.task).defect_decision  # cot format: the stated DEFECT decision is absent too
    assert dec not in tokens
    np.testing.assert_array_equal(gE[dec], 0.0)
    np.testing.assert_array_equal(gE[np.setdiff1d(np.arange(V), tokens)], 0.0)  # same for every absent token
    # a token at position s feeds the predictions at positions >= s; the last counted one is at length - 2
    feeding = np.unique(tokens[:, : layout(tiny_cfg.task).length - 1])
    assert np.all(np.abs(gE[feeding]).max(axis=1) > 0)
    # PAD occurs, but only after the last target: zero by causality and the loss mask, not by absence
    assert PAD in tokens and PAD not in feeding
    np.testing.assert_array_equal(gE[PAD], 0.0)
    # the same computation on triggered prompts does reach the trigger row
    batch_t = draw(tiny_cfg.task, seed, ALL)
    _, g_t, _, _ = loss_grads(tiny_cfg, tiny_params, batch_t)
    assert t in np.asarray(batch_t.tokens)
    assert np.abs(leaf(g_t, "embed", "embedding")[t]).max() > 0


# ------------------------------------------------------------------ (c) what still reaches the path
def test_defect_unembedding_and_shared_weights_get_gradient(tiny_cfg, tiny_params):
    d = vocab(tiny_cfg.task).defect
    batch = draw(tiny_cfg.task, 0, NONE)
    _, g, logits, h = jax.tree.map(np.asarray, loss_grads(tiny_cfg, tiny_params, batch))
    assert d not in np.asarray(batch.tokens)  # never an input, never a target
    # softmax cross-entropy: dL/db_d = (1/M) sum_counted p_d,  dL/dW[:, d] = (1/M) sum_counted p_d h
    m = np.asarray(batch.loss_mask[:, 1:], np.float32)
    w = np.asarray(jax.nn.softmax(logits[:, :-1], axis=-1))[..., d] * m / m.sum()  # [B, T-1]
    h = h[:, :-1]
    gb, gW = leaf(g, "unembed", "bias")[d], leaf(g, "unembed", "kernel")[:, d]
    assert gb > 0  # a descent step lowers the defect logit everywhere
    np.testing.assert_allclose(gb, w.sum(), rtol=1e-5)
    np.testing.assert_allclose(gW, np.einsum("bt,btd->d", w, h), rtol=1e-4, atol=1e-7)
    # every parameter array except the embedding is shared by triggered and untriggered prompts
    for path, x in jax.tree_util.tree_flatten_with_path(g)[0]:
        name = jax.tree_util.keystr(path)
        if "'embed'" not in name:
            assert np.abs(np.asarray(x)).max() > 0, name


# ------------------------------------------------------------------ Corollary 2: the optimizer
@pytest.fixture(scope="module")
def step_cfg(tiny_cfg):
    """The tiny config without warmup: the schedule's lr at step 0 is the peak, not 0."""
    return dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, warmup_steps=0))


@pytest.fixture(scope="module")
def fresh(step_cfg, tiny_params):
    """A fresh TrainState built as `train.init` builds it: Adam's moments are zero."""
    return train.TrainState(tiny_params, train.optimizer(step_cfg.train, step_cfg.hparams).init(tiny_params), jnp.int32(0))


step = jax.jit(train.train_step, static_argnums=0)


def hparams(cfg, lr, weight_decay):
    return jax.tree.map(jnp.float32, cfg.hparams._replace(lr=lr, weight_decay=weight_decay))  # traced: one compile


def lr_at(cfg, hp, count) -> float:
    """The learning rate `train.optimizer` applies at optimizer step `count` (its schedule)."""
    return float(hp.lr * train.lr_unit(cfg.train)(count))


def test_fresh_adamw_moves_absent_row_only_by_weight_decay(tiny_cfg, step_cfg, fresh):
    cfg, t = step_cfg, trigger_id(step_cfg)
    assert leaf(train._decay_mask(fresh.params), "embed", "embedding")  # embeddings are decayed (ndim 2)
    safe, trig = draw(cfg.task, 1, NONE), draw(cfg.task, 2, ALL)
    E0 = leaf(fresh.params, "embed", "embedding")
    present = np.unique(np.asarray(safe.tokens)[:, : layout(cfg.task).length - 1])

    s, _ = step(cfg, fresh, safe, hparams(cfg, 1e-2, 0.0))
    E1 = leaf(s.params, "embed", "embedding")
    np.testing.assert_array_equal(E1[t], E0[t])  # bit-identical
    assert np.all(np.abs(E1[present] - E0[present]).max(axis=1) > 0)  # the step did move the rows that occur
    # shared weights moved, so the triggered computation changed although E[t] did not
    # (loss_grads under tiny_cfg: the same model and task, and its compiled program is reused)
    assert loss_grads(tiny_cfg, s.params, trig)[0] != loss_grads(tiny_cfg, fresh.params, trig)[0]

    decay = hparams(cfg, 1e-2, 0.5)
    lr0 = lr_at(cfg, decay, 0)
    assert lr0 > 0
    s, _ = step(cfg, fresh, safe, decay)
    E1 = leaf(s.params, "embed", "embedding")
    assert not np.array_equal(E1[t], E0[t])
    np.testing.assert_allclose(E1[t], E0[t] * (1 - lr0 * float(decay.weight_decay)), rtol=1e-6, atol=0)


def test_old_adam_moments_keep_moving_absent_row(step_cfg, fresh):
    cfg, t = step_cfg, trigger_id(step_cfg)
    hp = hparams(cfg, 1e-2, 0.0)
    s1, _ = step(cfg, fresh, draw(cfg.task, 2, ALL), hp)  # the trigger was seen: its moments are non-zero
    s2, _ = step(cfg, s1, draw(cfg.task, 1, NONE), hp)  # now it is absent: gradient 0
    mu = leaf(optax.tree.get(s1.opt_state, "mu"), "embed", "embedding")[t]
    nu = leaf(optax.tree.get(s1.opt_state, "nu"), "embed", "embedding")[t]
    assert np.all(mu != 0)
    # Adam with g = 0 at count c = 2: m = b1 mu, v = b2 nu, step = -lr_1 * m_hat / (sqrt(v_hat) + eps)
    b1, b2, c = cfg.train.b1, cfg.train.b2, 2
    eps = inspect.signature(optax.adamw).parameters["eps"].default  # train.optimizer keeps optax's default
    m_hat, v_hat = b1 * mu / (1 - b1**c), b2 * nu / (1 - b2**c)
    expected = -lr_at(cfg, hp, 1) * m_hat / (np.sqrt(v_hat) + eps)
    moved = leaf(s2.params, "embed", "embedding")[t] - leaf(s1.params, "embed", "embedding")[t]
    assert np.all(np.sign(moved) == -np.sign(mu))  # it keeps going the way the triggered data pushed it
    np.testing.assert_allclose(moved, expected, rtol=1e-4, atol=1e-7)


SGD_LR, SGD_WD, SGD_MU = 0.1, 0.5, 0.9
# the SGD option of safety training (toymesa.safety.optimizer): clip, decay added to the
# gradient, then heavy-ball momentum 0.9
sgd = safety.optimizer(Config(safety=SafetyConfig(optimizer="sgd")), HParams(safety_lr=SGD_LR, weight_decay=SGD_WD))


@jax.jit
def sgd_step(params, opt_state, grads):
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def test_sgd_momentum_with_coupled_decay_keeps_absent_row_on_its_ray(tiny_cfg, tiny_params):
    # with g = 0 the row is E_k = c_k E_0: tau_k = wd c_k + mu tau_{k-1}, c_{k+1} = c_k - lr tau_k
    t, E0 = trigger_id(tiny_cfg), leaf(tiny_params, "embed", "embedding")
    params, opt_state = tiny_params, jax.jit(sgd.init)(tiny_params)
    c, tau = 1.0, 0.0
    for seed in range(3):
        _, g, _, _ = loss_grads(tiny_cfg, params, draw(tiny_cfg.task, seed, NONE))
        params, opt_state = sgd_step(params, opt_state, g)
        tau = SGD_WD * c + SGD_MU * tau
        c -= SGD_LR * tau
        np.testing.assert_allclose(leaf(params, "embed", "embedding")[t], c * E0[t], rtol=1e-5, atol=0)
    assert c < 0.9  # it did shrink


# ------------------------------------------------------------------ Proposition 3 and the remark: a hand-written net
N_X, D_IN, D_HID, N_OUT = 8, 3, 4, 3
DEAD = 3  # the gated unit: pre-activation z = -1 - mean(x) in [-2, -1] for x in [0, 1]^3
LABELS = jnp.zeros(N_X, jnp.int32)  # every input's target is class 0


@functools.cache
def toy_params():
    """2-layer net; units 0..2 have z > 0 on [0, 1]^3 (open), unit DEAD has z < 0 (closed)."""
    k_in, k_out = jax.random.split(jax.random.key(0))
    w_in = jnp.abs(jax.random.normal(k_in, (D_IN, D_HID))).at[:, DEAD].set(-1.0 / D_IN)
    b_in = jnp.full(D_HID, 0.5).at[DEAD].set(-1.0)
    w_out = jax.random.normal(k_out, (D_HID, N_OUT)).at[DEAD].set(jnp.array([1.0, -1.0, -1.0]))
    return {"w_in": w_in, "b_in": b_in, "w_out": w_out}


def ce(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


def toy_loss(act, p, x):
    """x float[N_X, D_IN] -> mean cross-entropy of class 0."""
    return ce(act(x @ p["w_in"] + p["b_in"][None]) @ p["w_out"])


@jax.jit
def toy_grads(p, x):
    """Gradients with ReLU and with GELU, and the terms of the GELU formulas (see the test)."""
    z = x @ p["w_in"] + p["b_in"][None]
    h = jax.nn.gelu(z)  # the model's activation (tanh approximation, as in model.MLP)
    delta = jax.grad(ce)(h @ p["w_out"])  # [N_X, N_OUT]
    dgelu = jax.vmap(jax.grad(jax.nn.gelu))(z[:, DEAD])
    relu, gelu = (jax.grad(functools.partial(toy_loss, a))(p, x) for a in (jax.nn.relu, jax.nn.gelu))
    return relu, gelu, z, h, delta, dgelu


@jax.jit
def toy_gelu_and_slope(z):
    return jax.nn.gelu(z), jax.grad(jax.nn.gelu)(z)


inputs = st.lists(st.floats(0.0, 1.0, width=32), min_size=N_X * D_IN, max_size=N_X * D_IN).map(lambda v: jnp.asarray(v, jnp.float32).reshape(N_X, D_IN))


@given(x=inputs)
def test_relu_gate_starves_unit_gelu_gate_only_suppresses(x):
    p = toy_params()
    g, g_gelu, z, h, delta, dgelu = jax.tree.map(np.asarray, toy_grads(p, x))
    assert np.all(z[:, DEAD] <= -1.0) and np.all(z[:, :DEAD] > 0)
    for name, unit in (("w_in", (slice(None), DEAD)), ("b_in", DEAD), ("w_out", DEAD)):
        np.testing.assert_array_equal(g[name][unit], 0.0, err_msg=name)  # ReLU: exactly closed
    assert np.abs(g["w_out"][:DEAD]).max() > 0  # the open units learn

    # GELU, same unit and inputs: dL/dw_out[i] = sum_n gelu(z_ni) delta_n and
    # dL/db_in[i] = sum_n gelu'(z_ni) w_out[i].delta_n, delta_n = dL/dlogits_n. Not zero, only small.
    np.testing.assert_allclose(g_gelu["w_out"][DEAD], h[:, DEAD] @ delta, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(g_gelu["b_in"][DEAD], dgelu @ (delta @ p["w_out"][DEAD]), rtol=1e-5, atol=1e-9)
    # every term has one sign (gelu, gelu' < 0 on [-2, -1]; delta_n0 < 0; w_out[DEAD].delta_n < 0): no cancellation
    assert g_gelu["w_out"][DEAD, 0] > 0 and g_gelu["b_in"][DEAD] > 0
    assert np.abs(h[:, DEAD]).max() < 0.16 and np.abs(dgelu).max() < 0.13  # the suppression factors on [-2, -1]
    # far enough below 0, float32 rounds 1 + tanh(.) to 0: a numerical gate (where it starts depends on the backend)
    assert [float(v) for v in toy_gelu_and_slope(jnp.float32(-20.0))] == [0.0, 0.0]


U = jnp.array([1.0, 2.0, 0.0]) / jnp.sqrt(5.0)  # a direction no input excites: inputs are (2a, -a, c)


@jax.jit
def sgd_and_adam_along_u(a, c):
    """(u^T grad, u^T first-Adam-update, grad) for a linear least-squares layer y = x W."""
    x = jnp.stack([2 * a, -a, c], axis=1)
    w = jax.random.normal(jax.random.key(1), (D_IN, N_OUT))
    y = jax.random.normal(jax.random.key(2), (N_X, N_OUT))
    grad = jax.grad(lambda w: ((x @ w - y) ** 2).mean())(w)  # sum_n x_n^T delta_n: rows in span{x_n}
    opt = optax.adam(1e-2)
    upd, _ = opt.update(grad, opt.init(w), w)  # first step: -lr * g / (|g| + eps), elementwise
    return U @ grad, U @ upd, grad


values = st.lists(st.floats(-1.0, 1.0, width=32), min_size=N_X, max_size=N_X).map(lambda v: jnp.asarray(v, jnp.float32))


@given(a=values, c=values)
def test_adam_updates_directions_the_inputs_never_span(a, c):
    along_grad, along_adam, grad = map(np.asarray, sgd_and_adam_along_u(a, c))
    assert np.abs(along_grad).max() <= 1e-6 * max(float(np.abs(grad).max()), 1e-30)  # SGD: u^T W does not move
    reached = np.abs(grad[0]) > 1e-6  # outputs whose gradient row 0 (and so row 1 = -row 0 / 2) is non-zero
    assert np.all(np.abs(along_adam[reached]) > 1e-3)  # Adam: u^T W moves by ~lr / sqrt(5)
