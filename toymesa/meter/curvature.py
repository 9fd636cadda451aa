"""The top eigenvalue of a loss Hessian by power iteration on Hessian-vector products.

Used to set the SGLD step size from the stiffest direction of the localised posterior
(`toymesa.meter.llc`). Hessian-vector products are forward-over-reverse (`jax.jvp` of
`jax.grad`), so the Hessian is never formed. The Hessian trace or top eigenvalue is not a
complexity measure (it is not invariant under reparametrisation); here it only scales a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hvp(f, w, v):
    """H(w) v for a scalar function `f` of a flat vector `w` (float[d]); returns float[d]."""
    return jax.jvp(jax.grad(f), (w,), (v,))[1]


def top_eigenvalue(f, w, key, iters: int = 20, mask=None):
    """The largest-magnitude eigenvalue of the Hessian of `f` at `w` (float[d]), by `iters`
    power iterations from a random start; with `mask` (float[d] of 0/1) the Hessian restricted to
    the masked coordinates. Returns (eigenvalue float[], unit eigenvector float[d]).

    The Rayleigh quotient vᵀHv of the last iterate is returned; it is within the power method's
    error of the eigenvalue of largest magnitude, and never larger than it in magnitude.
    """
    m = jnp.ones_like(w) if mask is None else mask
    v = jax.random.normal(key, w.shape, w.dtype) * m
    v = v / jnp.maximum(jnp.linalg.norm(v), 1e-30)

    def body(_, v):
        u = hvp(f, w, v) * m
        return u / jnp.maximum(jnp.linalg.norm(u), 1e-30)

    v = jax.lax.fori_loop(0, iters, body, v)
    return jnp.vdot(v, hvp(f, w, v) * m), v
