"""Activation patching (one site, sweeps over layer x position x head) and path patching.

Two runs of one model: the *clean* input x_c (the behaviour of interest, e.g. a triggered
prompt) and the *corrupted* input x_r (a minimal edit that removes it). Patching writes
activations of one run (the *source*) into the other (the *base*) and reads the metric m.
Directions, as Heimersheim & Nanda 2024 ("How to use and interpret activation patching"):

* ``denoise``  base x_r, source x_c: effect = m(x_r; a <- a_c) - m(x_r). Is the clean value
               of `a` *sufficient* to restore the behaviour?
* ``noise``    base x_c, source x_r: effect = m(x_c; a <- a_r) - m(x_c). Is the clean value
               of `a` *necessary* for it?

Effects are per example (leading axis B) and unnormalised; dividing by m(source) - m(base)
gives the fraction of the clean-corrupt difference moved (1: the site carries all of it).

Grid shapes (L layers, T positions, H heads): ``hook_z`` float32[B, L, T, H]; a residual-width
site (``hook_resid_pre``, ``hook_resid_mid``, ``hook_resid_post``, ``hook_attn_out``,
``hook_mlp_out``) float32[B, L, T], or K of them swept together float32[B, K, L, T]. A sweep
is one batched call: every cell is a one-hot mask over the whole grid, so each layer's site
carries an intervention whose mask is all False except in the cell's layer (an all-False
`jnp.where` leaves the value bit for bit).

Every function works on one model; `jax.vmap` over a leading parameter axis runs a population.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from toymesa.attribution.core import Metric, forward
from toymesa.config import Config
from toymesa.model import Intervention

DIRECTIONS = ("denoise", "noise")
GRID_KINDS = ("hook_z", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
LOGITS = ("ln_final.hook_normalized",)  # the unembedding's input: the receiver "logits"


class Sweep(NamedTuple):
    """Per-example effects of patching each grid cell, with the two unpatched metrics."""

    effect: jax.Array  # float32[B, L, T, H] (hook_z), [B, L, T] or [B, K, L, T]: m(base; cell <- source) - m(base)
    base: jax.Array  # float32[B]: m(base input)
    source: jax.Array  # float32[B]: m(source input)


def base_and_source(direction: str, clean, corrupt):
    """(base tokens, source tokens) of a direction: denoise (corrupt, clean), noise (clean, corrupt)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")
    return (corrupt, clean) if direction == "denoise" else (clean, corrupt)


def layer_sites(cfg: Config, kind: str) -> list[str]:
    """The site of grid `kind` in each layer, in layer order (e.g. blocks.{l}.attn.hook_z)."""
    if kind not in GRID_KINDS:
        raise ValueError(f"kind={kind!r} is not a grid site; use one of {', '.join(GRID_KINDS)}")
    if kind == "hook_mlp_out" and cfg.model.attn_only:
        raise ValueError("kind='hook_mlp_out': this model is attention-only (model.attn_only = true) and has no MLP")
    where = "attn." if kind == "hook_z" else ""
    return [f"blocks.{layer}.{where}{kind}" for layer in range(cfg.model.n_layers)]


def grid_shape(cfg: Config, kind: str, T: int) -> tuple[int, ...]:
    """(L, T, H) for hook_z, else (L, T)."""
    layer_sites(cfg, kind)  # validates kind
    return (cfg.model.n_layers, T, cfg.model.n_heads) if kind == "hook_z" else (cfg.model.n_layers, T)


def _site_mask(cell_mask):
    """bool[T, H] -> bool[1, T, H, 1] (hook_z); bool[T] -> bool[1, T, 1] (residual width)."""
    return cell_mask[None, ..., None]


def patch(cfg: Config, params, tokens, metric: Metric, site: str, value, mask=None):
    """(m float32[B], effect float32[B]): m(tokens; site <- value where mask) and its change
    from the unpatched run. `value` has the site's shape (or broadcasts to it at equal rank);
    `mask` is bool of the site's rank (None: everywhere)."""
    m0, _ = forward(cfg, params, tokens, metric)
    m1, _ = forward(cfg, params, tokens, metric, {site: Intervention(replace=value, replace_mask=mask)})
    return m1, m1 - m0


def sweep(cfg: Config, params, clean, corrupt, metric: Metric, kind="hook_z", direction: str = "denoise", batch: int | None = None) -> Sweep:
    """Patch every cell of the `kind` grid (layer x position [x head]) alone, in one batched call.

    effect[b, l, t(, h)] = m_b(base; site_l[t(, h)] <- source value) - m_b(base), per example;
    tokens int32[B, T]. `kind` may also be a tuple of K residual-width kinds, swept in the same
    call (one compiled program instead of K): effect float32[B, K, L, T], kinds in that order.
    The cells run as one `vmap`, or `batch` cells at a time (`lax.map`) to bound memory:
    B x batch forward passes live at once. m(base) is computed as one more cell with an empty
    mask, so a cell whose patch changes nothing has effect exactly 0 (a batched forward pass
    may round differently from an unbatched one).
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if len(kinds) > 1 and "hook_z" in kinds:
        raise ValueError("hook_z has its own grid (heads); sweep it alone, and the residual-width kinds together")
    sites = [s for k in kinds for s in layer_sites(cfg, k)]
    base, source = base_and_source(direction, clean, corrupt)
    m_src, src_cache = forward(cfg, params, source, metric)
    grid = (len(sites), *grid_shape(cfg, kinds[0], base.shape[1])[1:])  # (K L, T[, H])
    n = math.prod(grid)

    def one(cell):  # cell n: no cell, the base run through the same batched program
        onehot = (jnp.arange(n) == cell).reshape(grid)
        ivs = {s: Intervention(replace=src_cache[s], replace_mask=_site_mask(onehot[i])) for i, s in enumerate(sites)}
        return forward(cfg, params, base, metric, ivs)[0]

    cells = jnp.arange(n + 1)
    m = jax.vmap(one)(cells) if batch is None else jax.lax.map(one, cells, batch_size=batch)  # [n + 1, B]
    effect = jnp.moveaxis((m[:n] - m[n][None]).reshape(*grid, -1), -1, 0)
    if not isinstance(kind, str):
        effect = effect.reshape(effect.shape[0], len(kinds), cfg.model.n_layers, *grid[1:])
    return Sweep(effect, m[n], m_src)


def attention_input(cfg: Config, layer: int) -> tuple[str, ...]:
    """The receiver sites of layer `layer`'s attention input: its queries, keys and values."""
    return tuple(f"blocks.{layer}.attn.hook_{x}" for x in "qkv")


def mlp_input(cfg: Config, layer: int) -> tuple[str, ...]:
    """The receiver site of layer `layer`'s MLP input (its pre-activation)."""
    if cfg.model.attn_only:
        raise ValueError("this model is attention-only (model.attn_only = true) and has no MLP input")
    return (f"blocks.{layer}.mlp.hook_pre",)


def _nodes(cfg: Config) -> list[str]:
    """The sites path patching freezes: every head's output (hook_z) and every MLP output."""
    out = []
    for layer in range(cfg.model.n_layers):
        out.append(f"blocks.{layer}.attn.hook_z")
        if not cfg.model.attn_only:
            out.append(f"blocks.{layer}.hook_mlp_out")
    return out


def path_patch(cfg: Config, params, base, source, metric: Metric, sender: str, sender_mask, receivers, receiver_mask=None):
    """(m float32[B], effect float32[B]) of patching the path sender -> receivers only.

    The sender is a node site (``blocks.{l}.attn.hook_z`` with `sender_mask` bool[1, T, H, 1]
    picking heads and positions, or ``blocks.{l}.hook_mlp_out`` with bool[1, T, 1]). Receivers
    are input sites read by later nodes: `attention_input` (q, k, v), `mlp_input`, or
    `LOGITS` (the unembedding's input); `receiver_mask` (bool, broadcast to every receiver,
    e.g. bool[1, 1, H, 1] for some heads' q, k, v) restricts them, None: all of it.

    Run 1 (base tokens): the sender takes the source run's value where `sender_mask`; every
    other head output and MLP output (every site of `_nodes`) is frozen at its base-run value,
    so the residual stream is the base stream plus the sender's own write, and only
    LayerNorms, q/k/v and pre-activations are recomputed. The receivers' values are recorded.
    Run 2 (base tokens): the receivers are replaced by the recorded values; everything
    downstream of them is recomputed, everything else is the base run.
    effect = m(run 2) - m(base). To the logits in a model whose sender has no later node (a
    last-layer head of an attention-only model), this is plain activation patching.
    """
    frozen = _nodes(cfg)
    if sender not in frozen:
        raise ValueError(f"sender {sender!r} is not a node; use one of {', '.join(frozen)}")
    bad = [r for r in receivers if r in frozen]
    if bad:
        raise ValueError(f"receiver(s) {bad} are node outputs; give input sites (attention_input, mlp_input, LOGITS)")
    m_base, base_cache = forward(cfg, params, base, metric)
    _, src_cache = forward(cfg, params, source, metric)
    run1 = {s: Intervention(replace=base_cache[s]) for s in frozen}
    run1[sender] = Intervention(replace=jnp.where(sender_mask, src_cache[sender], base_cache[sender]))
    _, cache1 = forward(cfg, params, base, metric, run1)
    m, _ = forward(cfg, params, base, metric, {r: Intervention(replace=cache1[r], replace_mask=receiver_mask) for r in receivers})
    return m, m - m_base
