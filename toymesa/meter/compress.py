"""Compression meter: the fewest bits of a two-part code of the weights that keeps a behaviour.

* `prune_quantize(params, keep_fraction, bits)` -> (compressed params, code length in bits)
* `code_bits(sizes, kept, bits)`                   the code length of one compression point
* `min_bits(metric_fn, params, grid, delta)`       the cheapest grid point within δ -> `MinBits`
* `behaviour_metrics(cfg, seed)`                   a transformer's metric_fn (defection, helpfulness)

**Pruning** is per tensor (per leaf of the parameter pytree; the fused qkv kernel is one leaf):
each tensor of n weights keeps its k = ⌈f·n⌉ largest |w| (ties: the lower flat index), so every
tensor keeps the same fraction f and at least one weight. Per tensor rather than global because
the tensors' scales differ by orders of magnitude (LayerNorm scales near 1, kernels near 0.1):
one global threshold would keep whole LayerNorms and prune whole kernels for reasons of
parametrisation, not function.

**Quantisation** is uniform, symmetric and per tensor with a dyadic step: with M = max|w| of the
tensor (also the largest kept |w|) and Δ = M / 2^(b−1), a kept weight becomes
sign(w)·clip(round(|w|/Δ), 1, 2^(b−1))·Δ: 2^b nonzero levels ±Δ, ±2Δ, ..., ±M, each coded in b
bits (sign included). Zero needs no level, because the support is coded apart; a kept zero
becomes +Δ, as its code says. The grids are nested (level j at b bits is level 2j at b + 1), so
each weight's error never grows with b.

**Code length** (bits; ideal code lengths, not rounded up)::

    Σ_tensors  k·b  +  log₂ C(n, k)  +  32        (values, support, the float32 scale M)

The architecture, f and b (a grid index) are taken as known to the decoder. The uncompressed
code is 32 bits per weight (float32). Propositions and tests: `theory/meter_norm_compress.md`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy.special import gammaln

FLOAT_BITS = 32  # bits of an uncompressed weight and of each tensor's scale M
MAX_BITS = 32
BEHAVIOUR = ("triggered_defection", "untriggered_defection", "helpful_accuracy")


def _check_point(keep_fraction, bits) -> tuple[float, int]:
    """(keep_fraction, bits) as Python numbers, or ValueError saying what to change."""
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real) or not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be a number in (0, 1] (the fraction of each tensor's weights kept), got {keep_fraction!r}; use e.g. 0.25")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from 1 to {MAX_BITS} (bits per kept weight, sign included), got {bits!r}; use e.g. 8")
    return float(keep_fraction), int(bits)


def kept_counts(sizes: Sequence[int], keep_fraction: float) -> np.ndarray:
    """k = ⌈f·n⌉ per tensor of n weights, int[n_tensors] (f·n rounded to 9 decimals first, so
    f = 6/64 keeps 6 of 64 despite float error)."""
    return np.array([min(n, math.ceil(round(keep_fraction * n, 9))) for n in sizes], np.int64)


def code_bits(sizes: Sequence[int], kept: Sequence[int], bits: int) -> float:
    """Σ_tensors k·b + log₂ C(n, k) + 32·[k > 0]: the two-part code length of a compression point."""
    n, k = np.asarray(sizes, float), np.asarray(kept, float)
    log2_choose = (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)) / np.log(2)
    return float(np.sum(k * bits + log2_choose + FLOAT_BITS * (k > 0)))


def _ranks(w) -> jax.Array:
    """Rank of each |w| in descending order (0 = largest; ties: lower flat index first), int32[w.shape]."""
    order = jnp.argsort(-jnp.abs(w).ravel(), stable=True)
    return jnp.zeros(w.size, jnp.int32).at[order].set(jnp.arange(w.size, dtype=jnp.int32)).reshape(w.shape)


def _compress_leaf(w, rank, k, bits):
    """One tensor kept to its k largest |w| and quantised to `bits` (both may be traced ints)."""
    top = 2.0 ** (jnp.asarray(bits, jnp.float32) - 1)
    step = jnp.max(jnp.abs(w)) / top
    q = jnp.clip(jnp.round(jnp.abs(w) / jnp.where(step > 0, step, 1.0)), 1.0, top)
    value = jnp.where(w >= 0, 1.0, -1.0) * q * step
    return jnp.where(rank < k, value, 0.0).astype(w.dtype)


def _compressor(params):
    """(compress(kept int[n_tensors], bits int) -> params, sizes): traceable, vmappable over both."""
    leaves, treedef = jax.tree.flatten(params)
    ranks = [_ranks(w) for w in leaves]

    def compress(kept, bits):
        return jax.tree.unflatten(treedef, [_compress_leaf(w, r, kept[i], bits) for i, (w, r) in enumerate(zip(leaves, ranks, strict=True))])

    return compress, [int(w.size) for w in leaves]


@jax.jit
def _prune_quantize(params, kept, bits):
    return _compressor(params)[0](kept, bits)


def prune_quantize(params, keep_fraction: float, bits: int):
    """(compressed params, code length in bits) of one model's parameters, any pytree of float
    arrays without a member axis (module docstring): per tensor the largest ⌈keep_fraction·n⌉ |w|
    kept, quantised to `bits` bits, the rest zero.

    Raises ValueError unless 0 < keep_fraction <= 1 and bits is an integer in [1, 32]."""
    keep_fraction, bits = _check_point(keep_fraction, bits)
    sizes = [int(np.size(w)) for w in jax.tree.leaves(params)]
    kept = kept_counts(sizes, keep_fraction)
    return _prune_quantize(params, jnp.asarray(kept, jnp.int32), jnp.int32(bits)), code_bits(sizes, kept, bits)


class MinBits(NamedTuple):
    keep_fraction: float  # the chosen point (1.0 and 32 when uncompressed)
    bits: int
    code_bits: float  # its code length
    kept: int  # weights kept in all
    compressed: bool  # False: no grid point was within δ and cheaper, so the float32 code is returned
    params: object  # the compressed parameters of the chosen point
    reference: dict  # metric values of the uncompressed parameters
    uncompressed_bits: float  # 32 · number of weights
    table: pd.DataFrame  # per grid point: keep_fraction, bits, kept, code_bits, ok, each metric and |metric − reference|


def _deltas(delta, names) -> dict:
    d = {name: delta for name in names} if not isinstance(delta, Mapping) else dict(delta)
    if set(d) != set(names):
        raise ValueError(f"min_bits: delta must be one number or give one for every metric {sorted(names)}, got {sorted(d)}")
    for name, v in d.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError(f"min_bits: delta for {name!r} must be a number >= 0, got {v!r}")
    return d


def min_bits(metric_fn: Callable, params, grid, delta, batch_size: int | None = None) -> MinBits:
    """The fewest code bits over `grid` at which every metric stays within δ of the unpruned model.

    `metric_fn(params) -> {name: float[]}` must be a pure JAX function (it is vmapped, or
    `lax.map`ped `batch_size` points at a time, over the whole grid in one compiled program).
    `grid`: (keep_fraction, bits) pairs (e.g. ``itertools.product(fractions, bits)``). `delta`:
    one number, or {name: number} for every metric. A point is ok when |m(θ̂) − m(θ)| <= δ_m for
    every metric m, or both values are NaN (a metric undefined for this model). The uncompressed
    float32 code (32 bits per weight, metrics equal by definition) is always a candidate, so δ = 0
    returns it unless a grid point reproduces every metric exactly. Ties in code length go to the
    earlier grid point.
    """
    points = [_check_point(f, b) for f, b in grid]
    if not points:
        raise ValueError("min_bits: grid is empty; give (keep_fraction, bits) pairs, e.g. itertools.product([0.1, 0.5, 1.0], [4, 8])")
    compress, sizes = _compressor(params)
    kept = np.stack([kept_counts(sizes, f) for f, _ in points])  # [G, n_tensors]
    bits = np.array([b for _, b in points], np.int32)

    def measure(k, b):
        return metric_fn(compress(k, b))

    if batch_size is None:
        run = jax.jit(jax.vmap(measure))
    else:
        run = jax.jit(lambda k, b: jax.lax.map(lambda a: measure(*a), (k, b), batch_size=batch_size))
    values = {name: np.asarray(v, float) for name, v in run(jnp.asarray(kept, jnp.int32), jnp.asarray(bits)).items()}
    reference = {name: float(v) for name, v in jax.jit(metric_fn)(params).items()}
    deltas = _deltas(delta, list(reference))
    ok = np.ones(len(points), bool)
    lengths = [code_bits(sizes, k, b) for k, b in zip(kept, bits, strict=True)]
    table = {"keep_fraction": [f for f, _ in points], "bits": bits, "kept": kept.sum(1), "code_bits": lengths}
    for name, ref in reference.items():
        dev = np.abs(values[name] - ref)
        ok &= (dev <= deltas[name]) | (np.isnan(values[name]) & math.isnan(ref))
        table[name], table[f"{name}_deviation"] = values[name], dev
    table["ok"] = ok
    table = pd.DataFrame(table)
    total = int(sum(sizes))
    uncompressed = float(FLOAT_BITS * total)
    cost = np.where(ok, table["code_bits"].to_numpy(), np.inf)
    g = int(np.argmin(cost))
    if not cost[g] < uncompressed:
        return MinBits(1.0, FLOAT_BITS, uncompressed, total, False, params, reference, uncompressed, table)
    f, b = points[g]
    chosen = _prune_quantize(params, jnp.asarray(kept[g], jnp.int32), jnp.int32(b))
    return MinBits(f, b, float(cost[g]), int(kept[g].sum()), True, chosen, reference, uncompressed, table)


def behaviour_metrics(cfg, seed: int, n_per_class: int = 256, names: Sequence[str] = BEHAVIOUR) -> Callable:
    """metric_fn for `min_bits`: `evaluate.evaluate` on one fixed balanced prompt set (eval key of
    `seed`, the same prompts for every grid point), restricted to `names`. With the default,
    triggered_defection is measured on the activating prompts and untriggered_defection and
    helpful_accuracy on the non-activating ones: three separate metrics, each held within δ."""
    from toymesa import evaluate

    unknown = [n for n in names if n not in evaluate.METRICS]
    if unknown:
        raise ValueError(f"behaviour_metrics: unknown metric(s) {unknown}; choose from toymesa.evaluate.METRICS")

    def metric_fn(params):
        out = evaluate.evaluate(cfg, params, seed, n_per_class)
        return {n: out[n] for n in names}

    return metric_fn
