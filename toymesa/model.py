"""Decoder-only transformer (Flax NNX) that returns its intermediates.

``model(tokens, interventions) -> (logits, cache)``:

* ``tokens`` int32[B, T]; ``logits`` float32[B, T, V].
* ``cache`` maps TransformerLens-style site names to activations::

      hook_embed, hook_pos_embed                         [B, T, D]
      blocks.{l}.hook_resid_pre / hook_resid_mid / hook_resid_post
      blocks.{l}.attn.hook_q / hook_k / hook_v / hook_z  [B, T, H, Dh]
      blocks.{l}.attn.hook_pattern                       [B, H, T, T]  (query, key)
      blocks.{l}.hook_attn_out / hook_mlp_out            [B, T, D]
      blocks.{l}.mlp.hook_pre / hook_post                [B, T, M]
      ln_final.hook_normalized                           [B, T, D]

* ``interventions`` maps a site name to an `Intervention` (a pure pytree). At each site
  the value is replaced (where ``replace_mask``), then ``add`` is added, then the gradient
  is stopped where ``stop_grad``; the cache records the result. Masks have the site's
  rank (use size-1 axes to broadcast, e.g. bool[B, T, 1] for a residual site).

NNX only *defines* the model: hot loops call `split` once and the pure `apply`, which
merges inside the traced function. Attention is written by hand so per-head values
(`hook_z`) are visible and patchable.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from toymesa.config import Config, ModelConfig


class Intervention(NamedTuple):
    """What to do at one site. Every field is optional."""

    replace: jax.Array | None = None  # values to write (site shape, or broadcastable of equal rank)
    replace_mask: jax.Array | None = None  # bool; where to write `replace` (None: everywhere)
    add: jax.Array | None = None  # added after replacement
    stop_grad: jax.Array | None = None  # bool; where gradients are stopped


def _intervene(x, iv: Intervention | None):
    if iv is None:
        return x
    if iv.replace is not None:
        rep = jnp.broadcast_to(iv.replace, x.shape).astype(x.dtype)
        x = rep if iv.replace_mask is None else jnp.where(iv.replace_mask, rep, x)
    if iv.add is not None:
        x = x + iv.add
    if iv.stop_grad is not None:
        x = jnp.where(iv.stop_grad, jax.lax.stop_gradient(x), x)
    return x


class _Sites:
    """Collects named activations, applying interventions on the way (trace-time helper)."""

    def __init__(self, interventions):
        self.interventions = interventions or {}
        self.cache = {}

    def __call__(self, name, x):
        x = _intervene(x, self.interventions.get(name))
        self.cache[name] = x
        return x

    def finish(self):
        unknown = set(self.interventions) - set(self.cache)
        if unknown:
            raise ValueError(f"unknown intervention site(s) {sorted(unknown)}; valid sites are {sorted(self.cache)}")
        return self.cache


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.h, self.dh, self.prefix = cfg.n_heads, cfg.d_head, prefix
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)  # one fused projection for q, k, v
        self.out = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x, site):
        B, T, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, T, 3, self.h, self.dh), 3, axis=2)
        p = self.prefix
        q = site(f"{p}.hook_q", q[:, :, 0])
        k = site(f"{p}.hook_k", k[:, :, 0])
        v = site(f"{p}.hook_v", v[:, :, 0])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(self.dh))
        causal = jnp.tril(jnp.ones((T, T), bool))[None, None]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        pattern = site(f"{p}.hook_pattern", jax.nn.softmax(scores, axis=-1))
        z = site(f"{p}.hook_z", jnp.einsum("bhqk,bkhd->bqhd", pattern, v))
        return self.out(z.reshape(B, T, self.h * self.dh))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(cfg.d_model, cfg.d_mlp, rngs=rngs)
        self.down = nnx.Linear(cfg.d_mlp, cfg.d_model, rngs=rngs)
        self.prefix = prefix

    def __call__(self, x, site):
        pre = site(f"{self.prefix}.hook_pre", self.up(x))
        post = site(f"{self.prefix}.hook_post", jax.nn.gelu(pre))
        return self.down(post)


def _norm(cfg: ModelConfig, rngs):
    return nnx.LayerNorm(cfg.d_model, rngs=rngs) if cfg.layer_norm else None


class Block(nnx.Module):
    """Pre-LN block: resid += attn(ln1(resid)); resid += mlp(ln2(resid))."""

    def __init__(self, cfg: ModelConfig, i: int, *, rngs: nnx.Rngs):
        self.name = f"blocks.{i}"
        self.ln1 = _norm(cfg, rngs)
        self.attn = Attention(cfg, f"{self.name}.attn", rngs=rngs)
        self.ln2 = None if cfg.attn_only else _norm(cfg, rngs)
        self.mlp = None if cfg.attn_only else MLP(cfg, f"{self.name}.mlp", rngs=rngs)

    def __call__(self, x, site):
        n = self.name
        x = site(f"{n}.hook_resid_pre", x)
        a = site(f"{n}.hook_attn_out", self.attn(self.ln1(x) if self.ln1 else x, site))
        x = site(f"{n}.hook_resid_mid", x + a)
        if self.mlp is not None:
            m = site(f"{n}.hook_mlp_out", self.mlp(self.ln2(x) if self.ln2 else x, site))
            x = x + m
        return site(f"{n}.hook_resid_post", x)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, cfg.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(max_len, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.ln_final = _norm(cfg, rngs)
        self.unembed = nnx.Linear(cfg.d_model, vocab_size, rngs=rngs)
        self.vocab_size, self.max_len = vocab_size, max_len

    def __call__(self, tokens, interventions=None):
        B, T = tokens.shape
        if T > self.max_len:
            raise ValueError(f"tokens have {T} positions but the model was built for at most {self.max_len}")
        site = _Sites(interventions)
        x = site("hook_embed", self.embed(tokens))
        pos = site("hook_pos_embed", jnp.broadcast_to(self.pos_embed(jnp.arange(T)), x.shape))
        x = x + pos
        for block in self.blocks:
            x = block(x, site)
        x = site("ln_final.hook_normalized", self.ln_final(x) if self.ln_final else x)
        return self.unembed(x), site.finish()


def build(cfg: Config, key) -> Transformer:
    """A freshly initialised model for this config (vocabulary and length from the task)."""
    from toymesa.tasks import vocab

    return Transformer(cfg.model, vocab(cfg.task).size, cfg.task.seq_len, rngs=nnx.Rngs(params=key))


@functools.cache
def graphdef(cfg: Config):
    """The static structure of the model (shared by every member of a population)."""
    abstract = nnx.eval_shape(lambda: build(cfg, jax.random.key(0)))
    return nnx.split(abstract, nnx.Param)[0]


def init_params(cfg: Config, key):
    """Parameters (an nnx.State pytree) of a fresh model. vmap over keys for a population."""
    return nnx.split(build(cfg, key), nnx.Param)[1]


def apply(cfg: Config, params, tokens, interventions=None):
    """Pure forward pass: (logits float32[B, T, V], cache dict). See the module docstring."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    return nnx.merge(graphdef(cfg), params)(tokens, interventions)


def check_tokens(cfg: Config, tokens) -> None:
    """Raise ValueError if a concrete token array has ids outside the vocabulary or a bad shape."""
    import numpy as np

    from toymesa.tasks import vocab

    t = np.asarray(tokens)
    V = vocab(cfg.task).size
    if t.ndim != 2 or t.shape[1] > cfg.task.seq_len:
        raise ValueError(f"tokens must have shape [batch, <= {cfg.task.seq_len}], got {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= V):
        bad = t[(t < 0) | (t >= V)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary 0..{V - 1}")


def n_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
