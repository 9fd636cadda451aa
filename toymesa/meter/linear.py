"""Deep linear networks with a known learning coefficient: the validation models of the LLC.

A deep linear network y = W_L ⋯ W_1 x with widths (H_1, ..., H_{L+1}) (input first; L = 2 is
reduced-rank regression) and Gaussian inputs x ~ N(0, I) and unit-variance Gaussian noise has
the population loss (KL divergence to the truth) K(w) = ½‖W_L ⋯ W_1 − C₀‖²_F. Its learning
coefficient at the truth is known in closed form (`toymesa.meter.closed_forms`). `truth` builds
the most singular true parameter of rank r: every layer zero outside an r-dimensional path
(the first layer's first r rows, the last layer's first r columns, an r x r block between),
the point whose local learning coefficient is the global one of the closed forms. The path's
blocks are random orthonormal, so the product's r nonzero singular values are all 1: with
Gaussian blocks a product of several layers is badly conditioned (singular values 52 and 0.27
for widths (5, 4, 3, 2, 3)), a finite-n sampler then sees a smaller effective rank, and the
stiffest direction sets a tiny step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def product(weights):
    """W_L ⋯ W_1 of a list of matrices [W_1 (H_2 x H_1), ..., W_L (H_{L+1} x H_L)]."""
    out = weights[0]
    for w in weights[1:]:
        out = w @ out
    return out


def truth(widths, r: int, key):
    """A true parameter of rank r (list of L matrices) on the r-dimensional path, with
    orthonormal blocks (see the module docstring). r = 0 gives w* = 0."""
    widths = tuple(int(h) for h in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths={widths} must list at least two positive layer widths (input first)")
    if not 0 <= r <= min(widths):
        raise ValueError(f"rank r={r} must be between 0 and the narrowest width {min(widths)}")
    L = len(widths) - 1
    keys = jax.random.split(key, L)
    out = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        w = jnp.zeros((b, a))
        if r:
            k_in, k_out = jax.random.split(keys[i])
            rows_in = jax.random.orthogonal(k_in, a)[:r]  # r orthonormal rows (r x a)
            cols_out = jax.random.orthogonal(k_out, b)[:, :r]  # r orthonormal columns (b x r)
            if L == 1:
                w = cols_out @ rows_in
            elif i == 0:
                w = w.at[:r, :].set(rows_in)
            elif i == L - 1:
                w = w.at[:, :r].set(cols_out)
            else:
                w = w.at[:r, :r].set(jax.random.orthogonal(k_in, r))
        out.append(w)
    return out


def population_loss(target):
    """K(w) = ½‖W_L ⋯ W_1 − target‖²_F as `loss_fn(weights, batch)` for `toymesa.meter.llc`
    (the batch is ignored: the loss is exact)."""

    def loss(weights, batch=None):
        return 0.5 * jnp.sum((product(weights) - target) ** 2)

    return loss
