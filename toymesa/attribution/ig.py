"""Integrated gradients (Sundararajan et al. 2017) on any pytree input, with its completeness residual.

    IG_i(x; x') = (x_i - x'_i) * int_0^1 d f(x' + a (x - x')) / d x_i  da

Completeness: sum_i IG_i = f(x) - f(x'); with a quadrature rule of K nodes the sum misses
by the rule's error, returned as the *residual* (Captum's "convergence delta"):
residual = sum IG - (f(x) - f(x')). One left-Riemann node is (x - x') times the gradient at
the *baseline* x': at a site, attribution patching (`toymesa.attribution.atp`). Gradient x
(input - baseline) with the gradient at the input (`gradients.grad_times_delta`) is the same
node taken from the other end of the path.

Rules (nodes a_k and weights w_k on [0, 1]): ``gauss_legendre`` (exact for polynomial
integrands of degree 2K-1), ``riemann_left``, ``riemann_right``, ``riemann_mid``,
``trapezoid``. Gauss-Legendre nodes come from NumPy (`numpy.polynomial.legendre.leggauss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from toymesa.attribution.core import Metric, forward
from toymesa.config import Config
from toymesa.model import Intervention

RULES = ("gauss_legendre", "riemann_left", "riemann_right", "riemann_mid", "trapezoid")


def quadrature(steps: int, rule: str = "gauss_legendre") -> tuple[np.ndarray, np.ndarray]:
    """(nodes float64[K], weights float64[K]) of a K-node rule on [0, 1]; weights sum to 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = np.arange(steps)
    if rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
    if rule == "riemann_left":
        return k / steps, np.full(steps, 1 / steps)
    if rule == "riemann_right":
        return (k + 1) / steps, np.full(steps, 1 / steps)
    if rule == "riemann_mid":
        return (k + 0.5) / steps, np.full(steps, 1 / steps)
    if rule == "trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        w = np.full(steps, 1 / (steps - 1))
        w[[0, -1]] /= 2
        return k / (steps - 1), w
    raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")


def integrated_gradients(f, x, baseline, steps: int = 32, rule: str = "gauss_legendre", batch: int | None = None):
    """(IG pytree like x, residual float32[]) of the scalar function f along x' -> x.

    `x` and `baseline` are pytrees of the same structure. Gradients at the K nodes run as
    one vmapped call, or `batch` nodes at a time (`lax.map`) to bound memory.
    """
    nodes, weights = quadrature(steps, rule)
    diff = jax.tree.map(lambda a, b: a - b, x, baseline)
    grad_f = jax.grad(f)

    def at(alpha):
        return grad_f(jax.tree.map(lambda b, d: b + alpha.astype(d.dtype) * d, baseline, diff))

    alphas = jnp.asarray(nodes, jnp.float32)
    grads = jax.vmap(at)(alphas) if batch is None else jax.lax.map(at, alphas, batch_size=batch)
    w = jnp.asarray(weights, jnp.float32)
    avg = jax.tree.map(lambda g: jnp.tensordot(w, g, axes=1), grads)
    attr = jax.tree.map(lambda d, g: d * g, diff, avg)
    total = sum(jnp.sum(a) for a in jax.tree.leaves(attr))
    return attr, total - (f(x) - f(baseline))


def ig_site(cfg: Config, params, tokens, metric: Metric, site: str, start, end, steps: int = 32, rule: str = "gauss_legendre", interventions=None):
    """IG at one site along its value `start` -> `end` (e.g. a corrupted run's cached value
    -> the clean run's), every other site computed by the model: (IG [site shape], residual).

    The IG sums to m(site <- end) - m(site <- start) summed over the batch, up to the residual:
    the full-site patching effect, in nonlinear models too.
    """

    def f(value):
        ivs = dict(interventions or {})
        ivs[site] = Intervention(replace=value)
        return forward(cfg, params, tokens, metric, ivs)[0].sum()

    return integrated_gradients(f, end, start, steps, rule)
