"""The eager PyTorch population baseline computes what the JAX training step computes.

N=2 members of the tiny config with parameters copied from `train.init_population`: equal
per-member losses, gradients, and two clipped AdamW steps equal to optax's (constant lr).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from toymesa import train  # noqa: E402
from toymesa.tasks import sample_batch  # noqa: E402
from toymesa.torch_baseline import TorchPopulation, flatten_names, loss_mask, param_specs, time_steps  # noqa: E402

N = 2
VARIANTS = [
    {},
    {"flat": True},
    {"matmul": "einsum", "optimizer": "foreach"},
    {"attention": "sdpa"},
]


def flat_np(tree):
    return {k: np.asarray(v) for k, v in flatten_names(nnx.to_pure_dict(tree)).items()}


def batches(cfg, n_batches):
    """`n_batches` real task batches stacked [S, N, B, ...]: a leading member axis N, different rows per member."""
    return _batches(cfg.task, cfg.train.batch_size, n_batches)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batches(task, batch_size, n_batches):
    keys = jax.random.split(jax.random.key(0), (n_batches, N))
    return jax.vmap(jax.vmap(lambda k: sample_batch(task, k, 0.5, batch_size)))(keys)


@functools.partial(jax.jit, static_argnums=0)
def jax_losses(cfg, params, batch):
    return jax.vmap(lambda p, b: train.masked_loss(cfg, p, b)[0])(params, batch)


@functools.partial(jax.jit, static_argnums=0)
def reference(cfg, params, data):
    """JAX, per member, one optimizer step on each batch of `data`.

    Returns (losses [N], gradients, gradient norms [N, S]) of the first / every batch, and the parameters after all steps.
    """
    tx = train.optimizer(cfg.train, cfg.hparams)

    def step(carry, batch):
        p, s = carry
        loss, g = jax.value_and_grad(lambda p: train.masked_loss(cfg, p, batch)[0])(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), (loss, g, optax.tree.norm(g))

    def member(p, batches_of_member):
        (p, _), (losses, grads, norms) = jax.lax.scan(step, (p, tx.init(p)), batches_of_member)
        return losses[0], jax.tree.map(lambda g: g[0], grads), p, norms

    return jax.vmap(member, in_axes=(0, 1))(params, data)


def member(data, i):
    """Batch i of `data` as numpy arrays [N, B, T]."""
    return np.asarray(data.tokens[i]), np.asarray(data.loss_mask[i])


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    """Constant learning rate (no warmup, cosine to 100%), strong weight decay, clipping always active."""
    return tiny_cfg.replace(train=dict(warmup_steps=0, end_lr_fraction=1.0, grad_clip=0.05), hparams=dict(lr=1e-2, weight_decay=0.5))


@pytest.fixture(scope="module")
def params(tiny_cfg):
    return train.init_population(tiny_cfg, jnp.arange(N, dtype=jnp.int32)).params  # the model depends only on model and task


@pytest.fixture(scope="module")
def data(cfg):
    return batches(cfg, 2)


@pytest.fixture(scope="module")
def ref(cfg, params, data):
    return reference(cfg, params, data)


def test_param_names_and_shapes_match_jax(cfg, params, variant_cfg, variant_params):
    assert dict(param_specs(cfg)) == {k: v.shape[1:] for k, v in flat_np(params).items()}
    assert dict(param_specs(variant_cfg)) == {k: v.shape for k, v in flat_np(variant_params).items()}


@pytest.mark.parametrize("options", VARIANTS, ids=str)
def test_loss_matches_jax(cfg, params, data, ref, options):
    pop = TorchPopulation(cfg, N, **options)
    pop.load_from_jax(params)
    np.testing.assert_allclose(pop.loss(*member(data, 0)), ref[0], rtol=1e-4)


def test_loss_matches_jax_without_layer_norm_attn_only(variant_cfg, variant_params):
    vparams = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x[::-1]]), variant_params)  # two different members
    data = batches(variant_cfg, 2)
    want = jax_losses(variant_cfg, vparams, jax.tree.map(lambda x: x[0], data))
    pop = TorchPopulation(variant_cfg, N)
    pop.load_from_jax(vparams)
    np.testing.assert_allclose(pop.loss(*member(data, 0)), want, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, {"flat": True}], ids=str)
def test_gradients_match_jax(cfg, params, data, ref, options):
    pop = TorchPopulation(cfg, N, **options)
    pop.load_from_jax(params)
    ours, theirs = pop.grads(*member(data, 0)), flat_np(ref[1])
    assert set(ours) == set(theirs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_schedule_is_constant(cfg):
    unit = train.lr_unit(cfg.train)
    np.testing.assert_array_equal(unit(jnp.arange(cfg.train.steps)), 1.0)


@pytest.mark.parametrize("options", VARIANTS[:3], ids=str)
def test_two_clipped_adamw_steps_match_optax(cfg, params, data, ref, options):
    norms = np.asarray(ref[3])  # [N, steps]
    assert np.all(norms > cfg.train.grad_clip)  # clipping is active in every step
    assert np.all(norms[0] != norms[1])  # with a different factor per member
    pop = TorchPopulation(cfg, N, **options)
    pop.load_from_jax(params)
    for i in range(data.tokens.shape[0]):
        pop.step(*member(data, i))
    ours, theirs, start = pop.to_numpy(), flat_np(ref[2]), flat_np(params)
    d = cfg.model.d_model
    for name in theirs:
        a, b = ours[name] - start[name], theirs[name] - start[name]
        if name.endswith("attn.qkv.bias"):
            # The key bias adds q.b_k to a whole row of scores, which softmax ignores: its exact gradient is 0,
            # both frameworks return rounding noise (~1e-9) and Adam rescales noise. Compare the rest.
            a, b = np.delete(a, np.s_[d : 2 * d], axis=1), np.delete(b, np.s_[d : 2 * d], axis=1)
        # compare the parameter changes (up to ~lr = 1e-2 per step; weight decay alone moves a weight by ~1e-4):
        # atol 1e-5 allows Adam's amplification of rounding where a gradient is near zero
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_single_member_and_time_steps(cfg):
    pop = TorchPopulation(cfg, 1, seed=3)
    tokens = torch.zeros((1, 4, cfg.task.seq_len), dtype=torch.int64)
    mask = loss_mask(cfg, 1, 4)
    before = pop.loss(tokens, mask)
    assert before.shape == (1,) and np.isfinite(before).all()
    pop.step(tokens, mask)
    assert pop.loss(tokens, mask)[0] < before[0]
    threads = torch.get_num_threads()
    assert time_steps(cfg, 1, 1, threads=1, batch_size=4) > 0
    assert torch.get_num_threads() == threads


def test_rejects_mismatched_parameters(cfg, params, variant_cfg):
    pop = TorchPopulation(variant_cfg, N)
    with pytest.raises(ValueError, match="parameter names differ"):
        pop.load_from_jax(params)
    with pytest.raises(ValueError, match="shape"):
        TorchPopulation(cfg, N + 1).load_from_jax(params)
