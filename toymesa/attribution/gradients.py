"""Gradients as attributions: input gradients, gradient x (input - baseline), integrated
gradients on the embeddings and on the parameters, per-example and token-group gradients.

Axes as in the package docstring (B batch, T positions, D d_model, G groups). A metric maps
(logits, tokens) to float32[B]; gradients are of the batch sum sum_b m_b, so row b of an
activation gradient is example b's own (examples do not interact). Parameter gradients are
pytrees like ``params``. Every function is pure and works on one model; ``jax.vmap`` over a
leading parameter axis runs it on a population.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from toymesa import train
from toymesa.attribution import ig
from toymesa.attribution.core import Metric, forward, site_grad
from toymesa.config import Config, TaskConfig
from toymesa.model import Intervention
from toymesa.tasks import Batch, world


def input_grad(cfg: Config, params, tokens, metric: Metric, interventions=None):
    """d sum_b m_b / d e, float32[B, T, D]: the gradient w.r.t. the token embeddings
    e = E[tokens] (site ``hook_embed``, before the positional embedding is added).

    Row b is d m_b / d e_b. Summing it over the positions holding token v gives the
    gradient w.r.t. the embedding-table row E[v]. Other sites: `core.site_grad`.
    """
    return site_grad(cfg, params, tokens, metric, ["hook_embed"], interventions)[2]["hook_embed"]


def grad_times_delta_fn(f, x, baseline):
    """(x - x') * df/dx at x, elementwise, a pytree like x, for a scalar function f of a pytree.

    For a positively homogeneous f of degree 1 (a bias-free ReLU net) and x' = 0 the sum over
    all elements is f(x) (Euler's identity sum_i x_i df/dx_i = f(x)).
    """
    g = jax.grad(f)(x)
    return jax.tree.map(lambda a, b, d: (a - b) * d, x, baseline, g)


def grad_times_delta(cfg: Config, params, tokens, metric: Metric, site: str, baseline, interventions=None):
    """(a - a') * d sum_b m_b / d a at this run, [site shape]: gradient x (input - baseline).

    a is the site's cached value on `tokens` (after `interventions`), a' = `baseline` (an array
    of the site's shape, or broadcastable at equal rank; e.g. a corrupted run's cache). The
    gradient is taken at a, so this is exactly minus one left-Riemann step of IG along a -> a'
    (`ig.ig_site(..., start=a, end=a', steps=1, rule="riemann_left")`), i.e. minus attribution
    patching from this run towards the baseline.
    """
    _, cache, grads = site_grad(cfg, params, tokens, metric, [site], interventions)
    return (cache[site] - baseline) * grads[site]


def ig_embeddings(
    cfg: Config, params, tokens, metric: Metric, baseline=None, steps: int = 32, rule: str = "gauss_legendre", interventions=None, batch: int | None = None
):
    """Integrated gradients on the token embeddings (site ``hook_embed``) along e' -> e:
    (IG float32[B, T, D], residual float32[]).

        IG = (e - e') * int_0^1 d sum_b m_b(e' + a (e - e')) / d e  da

    e is this run's embedding of `tokens`, e' = `baseline` (default: zeros; the positional
    embedding stays). residual = sum IG - sum_b (m_b(e) - m_b(e')), the quadrature error
    (`ig.integrated_gradients`; `batch` bounds how many nodes run at once).
    """
    e = forward(cfg, params, tokens, metric, interventions)[1]["hook_embed"]
    e0 = jnp.zeros_like(e) if baseline is None else jnp.broadcast_to(baseline, e.shape).astype(e.dtype)

    def f(value):
        ivs = dict(interventions or {})
        ivs["hook_embed"] = Intervention(replace=value)
        return forward(cfg, params, tokens, metric, ivs)[0].sum()

    return ig.integrated_gradients(f, e, e0, steps, rule, batch)


def ig_params(
    cfg: Config, params_from, params_to, tokens, metric: Metric, steps: int = 32, rule: str = "gauss_legendre", interventions=None, batch: int | None = None
):
    """Integrated gradients on the parameters along the straight path theta0 -> theta1:
    (IG pytree like params, residual float32[]).

        IG = (theta1 - theta0) * int_0^1 d sum_b m_b(theta0 + a (theta1 - theta0)) / d theta  da

    Completeness: the leaves sum to sum_b m_b(theta1) - m_b(theta0) up to the residual.
    Group the leaves (e.g. by layer) to split the metric's change between parameter groups.
    `batch` bounds how many nodes run at once (`ig.integrated_gradients`). The path runs on
    the flattened vector float32[P] (one array instead of one per leaf: the same numbers, a
    smaller program).
    """
    x1, unravel = ravel_pytree(params_to)
    x0, _ = ravel_pytree(params_from)

    def f(flat):
        return forward(cfg, unravel(flat), tokens, metric, interventions)[0].sum()

    attr, residual = ig.integrated_gradients(f, x1, x0, steps, rule, batch)
    return unravel(attr), residual


def target_counts(batch: Batch, mask=None):
    """n_b, float32[B]: the number of target tokens of each example (mask[:, 1:] summed), with
    `mask` defaulting to ``batch.loss_mask`` as in `train.masked_loss`."""
    mask = batch.loss_mask if mask is None else mask
    return mask[:, 1:].sum(axis=1).astype(jnp.float32)


def per_example_grads(cfg: Config, params, batch: Batch, mask=None):
    """g_b = d L_b / d theta, a pytree like params with a leading axis B, where L_b is example
    b's own `train.masked_loss` (its mean cross-entropy over its n_b target tokens).

    `train.masked_loss` divides by the total count N = sum_b n_b, so exactly

        d L / d theta = sum_b (n_b / N) g_b          (n_b from `target_counts`)

    and mean_b g_b equals the batch gradient only when every n_b is the same (true for task
    batches, whose layout is fixed; not for an arbitrary `mask`). An example with n_b = 0 has
    g_b = 0.
    """
    mask = batch.loss_mask if mask is None else mask

    def one(example, m):
        single = jax.tree.map(lambda x: x[None], example)
        return jax.grad(lambda p: train.masked_loss(cfg, p, single, m[None])[0])(params)

    return jax.vmap(one)(batch, mask)


def target_groups(task: TaskConfig) -> np.ndarray:
    """bool[3, T]: the target positions of the task's format (`world.layout`) split into the
    reasoning tokens (strictly inside THINK ... END_THINK, as ``Batch.reasoning_mask``), the
    answer token, and the rest (THINK, END_THINK, ANS, EOS): a partition of the rows of
    ``Batch.loss_mask``, for `token_group_grads`. Without a think block the first is empty."""
    lay, pos = world.layout(task), np.arange(task.seq_len)
    target = (pos >= lay.prompt_len) & (pos < lay.length)
    reasoning = (pos > lay.think) & (pos < lay.end_think) & (lay.think >= 0)
    answer = pos == lay.answer
    return np.stack([reasoning, answer, target & ~reasoning & ~answer])


def token_group_grads(cfg: Config, params, batch: Batch, groups):
    """d L_g / d theta for each group of positions, a pytree like params with a leading axis G.

    groups: bool[G, T], the same positions in every row (task layouts are static; see
    `target_groups`); position t is the predicted token t, as in `train.masked_loss`. With
    ce_bt the cross-entropy of predicting token t of row b, m = batch.loss_mask and
    N = sum_{b,t} m_bt (the total target count),

        L_g = sum_{b,t} ce_bt m_bt groups[g, t] / N

    so when the groups partition the target positions, sum_g L_g = `train.masked_loss` and the
    group gradients add up to its gradient exactly. Non-target positions in a group are
    ignored; a target in two groups counts twice. One forward pass, G backward passes.
    """
    m = batch.loss_mask[:, 1:].astype(jnp.float32)  # [B, T-1]
    weights = groups[:, None, 1:].astype(jnp.float32) * m[None] / jnp.maximum(m.sum(), 1.0)  # [G, B, T-1]

    def group_losses(p):
        ce, _ = train.token_losses(cfg, p, batch.tokens)
        return (weights * ce[None]).sum(axis=(1, 2))

    return jax.jacrev(group_losses)(params)
