"""The local learning coefficient (LLC, λ̂) by SGLD on the localised tempered posterior.

    p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²),        λ̂ = nβ·(E_p[L_n(w)] − L_n(w*))

(Lau, Furman, Wang, Murfet, Wei, AISTATS 2025). L_n is the mean loss per sample (nats) on
ONE fixed data set of n samples (`data`, leading axis n, drawn once), or an exact population
loss (`data=None`, then `n` is given). L_n(w*) is computed on the whole set; each draw's loss
is the loss of its minibatch, drawn uniformly from the same set, an unbiased estimate of
L_n(w_t) (with `data=None`, the exact loss).

SGLD step (the convention of devinterp; BlackJAX's step size h is ε/2):

    Δw = −ε/2 · P·(nβ·∇L_batch(w) + γ(w − w*)) + N(0, ε·P)

with P = 1 (plain) or an RMSProp preconditioner (``precondition="rmsprop"``) built from the
loss gradient only, normalised to mean 1 over the sampled coordinates so ε keeps its scale.
A `mask` (weight-refined LLC) sets P = 0 outside the sampled subset. The update itself is
BlackJAX's overdamped-Langevin solver (`blackjax.sgmcmc.diffusions`) with an elementwise step
vector h = ε/2·P; BlackJAX has no preconditioned SGLD, and calling its solver with a vector
step gives both variants one code path.

Step size: given, or automatic ε = c / (nβ·max(λ_max, λ_floor) + γ), λ_max the top Hessian
eigenvalue of L_n at w* (power iteration, `toymesa.meter.curvature`) on the first `hvp_batch`
samples. The floor (default 1, in loss units per squared parameter unit) matters only where
the Hessian at w* nearly vanishes (w* = 0 of a deep linear network): there the curvature of
the posterior's typical set, not of w*, limits a stable step, and ε = c/γ would diverge.

Everything is a pure function of (params, key, data): `llc` runs one model; `llc_population`
vmaps it over a leading member axis (members x step sizes x chains in one compiled program).
Diagnostics per chain: λ̂, a thinned loss trace, the fraction of trace windows below L_n(w*),
the drift between the first and last quarter, divergence (a non-finite loss or parameter, or
a λ̂ above d, twice the largest possible value d/2: that chain is reported and left out of
the mean, never averaged in); split R-hat across chains; and the ε-plateau check: λ̂ at ε,
ε/2 and ε/4, each run for the same sampler time (ε/k for k times the steps, so the three
chains have mixed alike and differ only by the discretisation bias, which shrinks
monotonically as ε → 0). The check costs 1 + 2 + 4 = 7 times one run at ε.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.sgmcmc.diffusions import overdamped_langevin
from jax.flatten_util import ravel_pytree

from toymesa.meter.curvature import top_eigenvalue

PRECONDITIONERS = ("none", "rmsprop")


class Settings(NamedTuple):
    """Sampler settings, frozen across the models a comparison covers. Defaults are stated in
    `theory/meter.md` with the validation they passed."""

    chains: int = 4
    draws: int = 2000  # kept draws per chain, after burn-in
    burn_in: int = 500
    batch: int | None = 64  # minibatch per step; None: the whole set (deterministic gradient)
    gamma: float = 1.0  # localisation strength γ
    nbeta: float | None = None  # inverse temperature times n; None: n / log n
    step: float | None = None  # ε; None: automatic c / (nβ·λ_max + γ)
    step_c: float = 0.05  # c of the automatic step size (validated: theory/meter.md)
    lam_floor: float = 1.0  # floor on λ_max in the automatic step (see the module docstring)
    precondition: str = "none"  # "none" or "rmsprop"
    rms_decay: float = 0.99
    rms_eps: float = 1e-8
    thin: int = 20  # draws per window of the thinned trace
    plateau: bool = True  # also run ε/2 and ε/4 for the same sampler time (7x the cost)
    plateau_tol: float = 0.1  # relative change from ε to ε/4 that still counts as a plateau
    power_iters: int = 20
    hvp_batch: int = 256  # samples of the fixed set the Hessian's top eigenvalue is taken on

    def check(self) -> Settings:
        """Raise ValueError naming a field that cannot work; returns self."""
        for name in ("chains", "draws", "thin", "power_iters", "hvp_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"llc setting {name}={getattr(self, name)!r} must be a positive integer")
        if not isinstance(self.burn_in, int) or self.burn_in < 0:
            raise ValueError(f"llc setting burn_in={self.burn_in!r} must be an integer >= 0")
        if self.draws % self.thin or self.draws < 4 * self.thin:
            ok = max(4, self.draws // self.thin) * self.thin
            raise ValueError(f"llc setting draws={self.draws} must be a multiple of thin={self.thin} and at least 4 windows; e.g. draws={ok}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise ValueError(f"llc setting batch={self.batch!r} must be a positive integer or None (the whole set)")
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(f"llc setting precondition={self.precondition!r} is unknown; choose one of {PRECONDITIONERS}")
        for name in ("gamma", "step_c", "plateau_tol", "lam_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"llc setting {name}={getattr(self, name)!r} must be > 0")
        for name in ("nbeta", "step"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"llc setting {name}={v!r} must be a positive number, or None for the default")
        return self

    @property
    def scales(self) -> tuple[float, ...]:
        return (1.0, 0.5, 0.25) if self.plateau else (1.0,)


DEFAULT = Settings()


class LLC(NamedTuple):
    """One model's estimate. Shapes: C chains, S step sizes (ε, ε/2, ε/4 with the plateau
    check, else ε), W trace windows; under `llc_population` every field gains a leading axis."""

    llc: jax.Array  # float[]: mean λ̂ over the non-divergent chains at ε (NaN if all diverged)
    llc_std: jax.Array  # float[]: standard deviation of λ̂ over those chains
    chain_llc: jax.Array  # float[C] at ε
    llc_by_step: jax.Array  # float[S]: mean λ̂ at each step size
    plateau_ok: jax.Array  # bool[]: |λ̂(ε) − λ̂(ε/4)| <= tol·|λ̂(ε/4)| (True without the check)
    divergent: jax.Array  # bool[S, C]
    trace: jax.Array  # float[C, W]: window means of the draws' losses at ε
    frac_below: jax.Array  # float[C]: share of windows below L_n(w*) (w* not a minimum if large)
    drift: jax.Array  # float[C]: nβ·(mean of the last quarter − mean of the first quarter)
    rhat: jax.Array  # float[]: split R-hat of the draws' losses across chains at ε
    loss0: jax.Array  # float[]: L_n(w*) on the whole set
    step: jax.Array  # float[]: ε
    nbeta: jax.Array  # float[]
    lam_max: jax.Array  # float[]: top Hessian eigenvalue of L_n at w* (NaN if ε was given)
    n_sampled: jax.Array  # int[]: parameters sampled (the mask's size)


def default_nbeta(n: int) -> float:
    """nβ = n / log n, the default inverse temperature (Watanabe's WBIC temperature)."""
    if n < 2:
        raise ValueError(f"the data set has n={n} samples; the tempered posterior needs n >= 2")
    return n / math.log(n)


def mask_vector(params, mask) -> jax.Array:
    """The mask (a pytree of bools shaped like `params`, or None for all) as float[d] of 0/1."""
    if mask is None:
        return jnp.ones_like(ravel_pytree(params)[0])
    return ravel_pytree(jax.tree.map(lambda p, m: jnp.broadcast_to(m, jnp.shape(p)).astype(jnp.asarray(p).dtype), params, mask))[0]


def check_mask(params, mask) -> None:
    """Raise ValueError if a concrete mask selects no parameter."""
    if mask is None:
        return
    v = mask_vector(params, mask)
    if not isinstance(v, jax.core.Tracer) and not bool(jnp.any(v > 0)):
        raise ValueError("the mask selects no parameter; choose a mask with at least one True entry (e.g. one head's weights or the trigger's embedding rows)")


def _minibatch(data, key, batch: int | None):
    if data is None or batch is None:
        return data
    n = jax.tree.leaves(data)[0].shape[0]
    if batch >= n:
        return data
    idx = jax.random.randint(key, (batch,), 0, n)
    return jax.tree.map(lambda x: x[idx], data)


def _head(data, k: int):
    return None if data is None else jax.tree.map(lambda x: x[:k], data)


def split_rhat(x):
    """Split R-hat (Gelman et al.) of float[C, T] draws: each chain's halves count as chains."""
    t = x.shape[1] // 2
    halves = jnp.concatenate([x[:, :t], x[:, t : 2 * t]], axis=0)
    within = halves.var(axis=1, ddof=1).mean()
    between = t * halves.mean(axis=1).var(ddof=1)
    var_hat = (t - 1) / t * within + between / t
    return jnp.sqrt(var_hat / within)


def _chain(loss_at, w0, data, nbeta, gamma, eps, m, key, s: Settings, n_steps: int):
    """One chain of `n_steps` steps: per-step minibatch losses float[n_steps] and the final position."""
    solver = overdamped_langevin()
    rms = s.precondition == "rmsprop"
    n_m = jnp.maximum(m.sum(), 1.0)

    def step(carry, k):
        w, v, t = carry
        k_batch, k_noise = jax.random.split(k)
        loss, g = jax.value_and_grad(loss_at)(w, _minibatch(data, k_batch, s.batch))
        p = m
        if rms:
            v = s.rms_decay * v + (1 - s.rms_decay) * g**2
            raw = m / (jnp.sqrt(v / (1 - s.rms_decay ** (t + 1))) + s.rms_eps)
            p = raw * n_m / jnp.maximum(raw.sum(), 1e-30)
        drift = nbeta * g + gamma * (w - w0)
        w = solver(k_noise, w, -drift, eps / 2 * p)
        return (w, v, t + 1), loss

    keys = jax.random.split(key, n_steps)
    (w, _, _), losses = jax.lax.scan(step, (w0, jnp.zeros_like(w0), 0), keys)
    return losses, w


def llc(loss_fn, params, key, data=None, n: int | None = None, settings: Settings = DEFAULT, mask=None) -> LLC:
    """λ̂ of the model `params` (a pytree, w*) for `loss_fn(params, batch) -> float[]` (mean loss
    per sample in nats; `batch` is a minibatch of `data`, or None with `data=None`).

    `data`: the fixed set (pytree, leading axis n) or None (exact loss; give `n`). `mask`:
    pytree of bools like `params` (weight-refined LLC), None for every parameter. Pure and
    vmappable (see `llc_population`); returns an `LLC`.
    """
    s = settings
    if data is not None:
        n_data = jax.tree.leaves(data)[0].shape[0]
        if n is not None and n != n_data:
            raise ValueError(f"n={n} but the data set has {n_data} samples; leave n unset to use the set's size")
        n = n_data
    if n is None:
        raise ValueError("with data=None (an exact loss) give n, the sample size the posterior is tempered for")
    nbeta = jnp.float32(default_nbeta(n) if s.nbeta is None else s.nbeta)
    w0, unravel = ravel_pytree(params)
    m = mask_vector(params, mask)

    def loss_at(w, batch):
        return loss_fn(unravel(w), batch)

    loss0 = loss_at(w0, data)
    k_power, k_chains = jax.random.split(key)
    if s.step is None:
        hvp_data = _head(data, s.hvp_batch)
        lam, _ = top_eigenvalue(lambda w: loss_at(w, hvp_data), w0, k_power, s.power_iters, m)
        lam = jnp.abs(lam)
        eps = s.step_c / (nbeta * jnp.maximum(lam, s.lam_floor) + s.gamma)
    else:
        lam, eps = jnp.float32(jnp.nan), jnp.float32(s.step)
    chain_keys = jax.random.split(k_chains, s.chains)
    run = functools.partial(_chain, loss_at, w0, data, nbeta, s.gamma, m=m, s=s)
    chain, finite, kept = [], [], None
    for scale in s.scales:  # the same sampler time at every step size: ε/k runs k times the steps
        k = round(1 / scale)
        losses, w_end = jax.vmap(lambda key, k=k, scale=scale: run(eps=eps * scale, key=key, n_steps=k * (s.burn_in + s.draws)))(chain_keys)
        kept_k = losses[:, k * s.burn_in :]  # [C, k·draws]
        if k == 1:
            kept = kept_k  # the draws at ε: trace, drift and R-hat
        chain.append(nbeta * (kept_k.mean(axis=-1) - loss0))
        finite.append(jnp.all(jnp.isfinite(kept_k), axis=-1) & jnp.all(jnp.isfinite(w_end), axis=-1))
    chain, finite = jnp.stack(chain), jnp.stack(finite)  # [S, C]
    d = m.sum()
    divergent = ~finite | (chain > d)
    good = ~divergent
    n_good = good.sum(axis=1)
    by_step = jnp.where(good, chain, 0.0).sum(axis=1) / n_good
    by_step = jnp.where(n_good > 0, by_step, jnp.nan)
    centred = jnp.where(good[0], chain[0] - by_step[0], 0.0)
    std = jnp.sqrt((centred**2).sum() / jnp.maximum(n_good[0] - 1, 1))
    plateau_ok = jnp.abs(by_step[0] - by_step[-1]) <= s.plateau_tol * jnp.abs(by_step[-1])
    windows = kept.reshape(s.chains, s.draws // s.thin, s.thin).mean(axis=-1)
    q = max(1, windows.shape[1] // 4)
    drift = nbeta * (windows[:, -q:].mean(axis=1) - windows[:, :q].mean(axis=1))
    return LLC(
        llc=by_step[0],
        llc_std=std,
        chain_llc=chain[0],
        llc_by_step=by_step,
        plateau_ok=plateau_ok if s.plateau else jnp.bool_(True),
        divergent=divergent,
        trace=windows,
        frac_below=(windows < loss0).mean(axis=1),
        drift=drift,
        rhat=split_rhat(kept) if s.chains > 1 else jnp.float32(jnp.nan),
        loss0=loss0,
        step=eps,
        nbeta=nbeta,
        lam_max=lam,
        n_sampled=d.astype(jnp.int32),
    )


@functools.lru_cache(maxsize=64)
def _program(loss_fn, settings: Settings, n: int | None, population: bool, batched_data: bool):
    """The jitted estimator for one (loss, settings) pair, reused across calls (a new closure
    per call would retrace and recompile every time)."""

    def one(p, k, d, mask):
        return llc(loss_fn, p, k, d, n, settings, mask)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0 if batched_data else None, None)) if population else one)


def llc_population(loss_fn, params, keys, data=None, n: int | None = None, settings: Settings = DEFAULT, mask=None) -> LLC:
    """`llc` for every member of a population: `params`, `keys` (key[N]) and `data` (if not
    None) carry a leading member axis; `mask` is shared. One compiled program (members x step
    sizes x chains), cached per (loss_fn, settings); every `LLC` field gains the leading axis N."""
    settings.check()
    check_mask(jax.tree.map(lambda x: x[0], params), mask)
    return _program(loss_fn, settings, n, True, data is not None)(params, keys, data, mask)


def estimate(loss_fn, params, key, data=None, n: int | None = None, settings: Settings = DEFAULT, mask=None) -> LLC:
    """`llc` of one model, checked and compiled (cached per (loss_fn, settings)): the entry
    point for a single model."""
    settings.check()
    check_mask(params, mask)
    return _program(loss_fn, settings, n, False, data is not None)(params, key, data, mask)
