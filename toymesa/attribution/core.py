"""Metrics, the forward pass the attribution methods differentiate, and gradients at sites.

A metric is ``metric(logits float32[B, T, V], tokens int32[B, T]) -> float32[B]``. Position
conventions: ``position`` is the position of the *predicted* token, so its logits are read
at ``position - 1``.

The gradient at a site is taken through a zero ``add`` intervention: d m / d add at add = 0
equals d m / d (activation) exactly, and the forward pass is unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from toymesa import model
from toymesa.config import Config
from toymesa.model import Intervention

Metric = Callable[[jax.Array, jax.Array], jax.Array]


def token_logprob(position: int, token=None) -> Metric:
    """log p(token | prefix) of the token at `position` (default: the one in the sequence;
    an int or int32[B] picks another), per example."""

    def metric(logits, tokens):
        logp = jax.nn.log_softmax(logits[:, position - 1], axis=-1)
        tok = tokens[:, position] if token is None else jnp.broadcast_to(jnp.asarray(token, jnp.int32), tokens.shape[:1])
        return jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]

    return metric


def logit_diff(position: int, good, bad) -> Metric:
    """logit(good) - logit(bad) for the token at `position` (ints or int32[B]), per example.
    Affine in the final residual stream, unlike a log-probability."""

    def metric(logits, tokens):
        row = logits[:, position - 1]
        g = jnp.broadcast_to(jnp.asarray(good, jnp.int32), tokens.shape[:1])
        b = jnp.broadcast_to(jnp.asarray(bad, jnp.int32), tokens.shape[:1])
        return jnp.take_along_axis(row, g[:, None], axis=-1)[:, 0] - jnp.take_along_axis(row, b[:, None], axis=-1)[:, 0]

    return metric


def forward(cfg: Config, params, tokens, metric: Metric, interventions=None):
    """(metric float32[B], cache) of one forward pass with `interventions`."""
    logits, cache = model.apply(cfg, params, tokens, interventions)
    return metric(logits, tokens), cache


def site_shapes(cfg: Config, tokens) -> dict:
    """{site: jax.ShapeDtypeStruct} of every cache site for a token batch of this shape."""
    return jax.eval_shape(lambda p, t: model.apply(cfg, p, t)[1], jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0))), tokens)


def sites_like(cfg: Config, pattern: str = "") -> list[str]:
    """Site names containing `pattern` (e.g. "hook_z"), in the model's order."""
    shapes = site_shapes(cfg, jax.ShapeDtypeStruct((1, cfg.task.seq_len), jnp.int32))
    names = [s for s in shapes if pattern in s]
    if not names:
        raise ValueError(f"no site matches {pattern!r}; sites are {', '.join(shapes)}")
    return names


def with_add(interventions, deltas: dict) -> dict:
    """`interventions` with `deltas[site]` added at each site (after any replacement there)."""
    out = dict(interventions or {})
    for site, d in deltas.items():
        iv = out.get(site, Intervention())
        out[site] = iv._replace(add=d if iv.add is None else iv.add + d)
    return out


def site_grad(cfg: Config, params, tokens, metric: Metric, sites: Sequence[str], interventions=None):
    """(metric float32[B], cache, {site: d sum_b m_b / d site}) in one backward pass. Each
    gradient has its site's shape; row b is the gradient of example b's metric."""
    shapes = site_shapes(cfg, tokens)
    zeros = {s: jnp.zeros(shapes[s].shape, shapes[s].dtype) for s in sites}

    def total(deltas):
        m, cache = forward(cfg, params, tokens, metric, with_add(interventions, deltas))
        return m.sum(), (m, cache)

    grads, (m, cache) = jax.grad(total, has_aux=True)(zeros)
    return m, cache, grads
